"""Names of the checkpoint files and the rules for pruning them.

File names are the user's and fixed (epochs count from 0, as Lightning's progress bar does;
``epoch_{n}.pth`` closes epoch ``n`` and its ``epoch`` key is ``n``):

=============================  ============  ==========================================
file                           kind          written when
=============================  ============  ==========================================
``epoch_{n}.pth``              epoch         after every epoch (full training state)
``best_model.pth``             best          the monitored metric improves
``epoch_{n}_error.pth``        error         a training step raised
``epoch_{n}_val_error.pth``    val_error     validation raised
``epoch_{n}_nan.pth``          nan           the training loss or a gradient was NaN/Inf
``epoch_{n}_preempt.pth``      preempt       SIGTERM/SIGUSR1 stopped epoch ``n`` early
``backup_{name}.pth``          backup        the user backs a file up (never pruned)
=============================  ============  ==========================================

A preemption file holds the state after the last optimizer step before the signal, inside
epoch ``n`` (or at its end when that epoch's own file could not be written): it is newer than
``epoch_{n-1}.pth`` and older than ``epoch_{n}.pth``, which is the order :func:`progress_key`
gives and ``--ckpt_path last`` follows.
"""

import re
from collections.abc import Iterable
from pathlib import Path

BEST_FILE = "best_model.pth"
BACKUP_PREFIX = "backup_"
CHECKPOINT_SUFFIX = ".pth"
KINDS = ("epoch", "best", "error", "val_error", "nan", "backup", "preempt")

_EPOCH_PATTERN = re.compile(r"^epoch_(\d+)(?:_(error|val_error|nan|preempt))?\.pth$")


def epoch_file(epoch: int) -> str:
    return f"epoch_{epoch}.pth"


def error_file(epoch: int) -> str:
    return f"epoch_{epoch}_error.pth"


def val_error_file(epoch: int) -> str:
    return f"epoch_{epoch}_val_error.pth"


def nan_file(epoch: int) -> str:
    return f"epoch_{epoch}_nan.pth"


def preempt_file(epoch: int) -> str:
    return f"epoch_{epoch}_preempt.pth"


def backup_file(name: str) -> str:
    """``backup_{name}.pth``; ``name`` may already carry the prefix or the suffix."""
    name = name.removesuffix(CHECKPOINT_SUFFIX).removeprefix(BACKUP_PREFIX)
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"Backup name {name!r} must be a plain, non-empty file name.")
    return f"{BACKUP_PREFIX}{name}{CHECKPOINT_SUFFIX}"


def classify(path) -> tuple:
    """Kind and epoch of a checkpoint file from its name.

    Returns:
        ``(kind, epoch)``: kind is one of ``KINDS`` or None for a name that is not ours;
        epoch is None where the name carries none (best, backup).
    """
    name = Path(path).name
    match = _EPOCH_PATTERN.match(name)
    if match:
        return match.group(2) or "epoch", int(match.group(1))
    if name == BEST_FILE:
        return "best", None
    if name.startswith(BACKUP_PREFIX) and name.endswith(CHECKPOINT_SUFFIX):
        return "backup", None
    return None, None


def epoch_files(folder) -> list:
    """``epoch_{n}.pth`` files of ``folder``, oldest epoch first (by number, not file time)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(classify(path)[1], path) for path in folder.iterdir()
             if classify(path)[0] == "epoch"]
    return [path for _, path in sorted(found)]


def progress_key(path) -> tuple | None:
    """Sort key of the resumable files by training progress; None for other files.

    ``epoch_{n}_preempt.pth`` (stopped inside epoch ``n``) sorts after ``epoch_{n-1}.pth`` and
    before ``epoch_{n}.pth`` (epoch ``n`` complete).
    """
    kind, epoch = classify(path)
    if kind == "epoch":
        return epoch, 1
    if kind == "preempt":
        return epoch, 0
    return None


def resumable_files(folder) -> list:
    """Epoch and preemption files of ``folder``, least progress first (see :func:`progress_key`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(progress_key(path), path) for path in folder.iterdir()
             if progress_key(path) is not None]
    return [path for _, path in sorted(found)]


def files_to_prune(candidates: Iterable, keep_last: int,
                   protected: Iterable | None = None) -> list:
    """Which epoch files to delete so that the ``keep_last`` newest remain.

    Only ``epoch_{n}.pth`` files among ``candidates`` are considered; best, error, NaN and
    backup files never are. ``protected`` files (the one a run resumed from, say) are never
    returned and do not count towards ``keep_last``.

    Args:
        candidates: paths that may be deleted (a run passes only the files it wrote).
        keep_last: newest epoch files to keep, >= 1.
        protected: paths never to delete.

    Returns:
        Paths to delete, oldest first.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}.")
    protected = {Path(path).resolve() for path in (protected or ())}
    epochs = sorted(
        (classify(path)[1], Path(path)) for path in candidates
        if classify(path)[0] == "epoch" and Path(path).resolve() not in protected
    )
    excess = len(epochs) - keep_last
    return [path for _, path in epochs[:excess]] if excess > 0 else []
