"""Choosing and checking the checkpoint a run resumes from.

``--ckpt_path last`` means the newest file of ``training.save_dir`` that loads and holds a state
to resume, newest by training progress: ``epoch_{n}.pth``; ``epoch_{n}_preempt.pth`` (newer than
``epoch_{n-1}.pth``, older than ``epoch_{n}.pth``); and ``best_model.pth`` when its epoch is later
than that of every epoch and preemption file there (it is written just before the epoch file
of its epoch, so a kill between the two leaves it the newest state). A damaged newer file is
skipped with a warning naming it. ``--ckpt_path best`` means ``best_model.pth``.

Before Lightning restores anything, :func:`check_resume_compatible` fails fast on a model whose
parameter shapes differ from the checkpoint's and lists every other hyperparameter difference
in one warning.
"""

import logging
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_warn

from callbacks.checkpoint_files import BEST_FILE, progress_key, resumable_files

log = logging.getLogger(__name__)

# What Lightning needs to continue a fit from a file.
RESUME_KEYS = ("state_dict", "loops", "optimizer_states", "lr_schedulers")
SPECIAL_PATHS = ("last", "best")
MAX_LISTED = 12


def load_checkpoint(path) -> dict:
    """Load a checkpoint the way Lightning will (``weights_only=True``, onto the CPU).

    Raises:
        ValueError: the file is damaged, not a dict, or refuses to load with weights_only.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} does not load ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error
    if not isinstance(checkpoint, dict):
        # One error type for every unusable file, so callers skip them alike.
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, "  # noqa: TRY004
                         "not a checkpoint dict")
    return checkpoint


def read_summary(path) -> dict | None:
    """The top-level keys of a checkpoint file, weights memory-mapped, not read; None if it
    does not load (missing, damaged, foreign format)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file is "not known to be ours"
        return None
    return checkpoint if isinstance(checkpoint, dict) else None


def resume_candidates(folder) -> list:
    """Files of ``folder`` a run can resume from, newest by progress first (module docstring)."""
    candidates = [(progress_key(path), path) for path in resumable_files(folder)]
    best = Path(folder) / BEST_FILE
    summary = read_summary(best) if best.is_file() else None
    latest = max((key[0] for key, _ in candidates), default=-1)
    if summary is not None and isinstance(summary.get("epoch"), int) and summary["epoch"] > latest:
        candidates.append(((summary["epoch"], 1), best))
    return [path for _, path in sorted(candidates, reverse=True)]


def newest_loadable_resume_file(folder) -> tuple:
    """``(path, checkpoint)`` of the newest file of :func:`resume_candidates` that loads and
    holds a resumable state, or ``(None, None)``; each file skipped is named in a warning."""
    for path in resume_candidates(folder):
        try:
            checkpoint = load_checkpoint(path)
            missing = [key for key in RESUME_KEYS if key not in checkpoint]
            if missing:
                raise ValueError(f"{path} lacks {missing}")
        except ValueError as error:
            rank_zero_warn(f"--ckpt_path last: skipping damaged checkpoint {path}: {error}")
            continue
        return path, checkpoint
    return None, None


def resolve_ckpt_path(ckpt_path, save_dir) -> tuple:
    """Turn ``last`` and ``best`` into files of ``save_dir`` and load the chosen file.

    Args:
        ckpt_path: the ``--ckpt_path`` value: None, ``last``, ``best`` or a path.
        save_dir: ``training.save_dir``.

    Returns:
        ``(path, checkpoint)``: ``(None, None)`` to start afresh (no ``ckpt_path``, or ``last``
        with no loadable epoch file); ``(ckpt_path, None)`` for a value left to Lightning (a
        path that does not exist, ``hpc``, a registry name).

    Raises:
        FileNotFoundError: ``best`` without ``best_model.pth``.
        ValueError: the chosen file does not load.
    """
    if ckpt_path is None:
        return None, None
    save_dir = Path(save_dir)
    if ckpt_path == "last":
        path, checkpoint = newest_loadable_resume_file(save_dir)
        if path is None:
            rank_zero_warn(f"--ckpt_path last: no loadable epoch or preemption checkpoint in "
                           f"{save_dir}; starting from scratch.")
            return None, None
        log.info("--ckpt_path last resolves to %s", path)
        return str(path), checkpoint
    if ckpt_path == "best":
        path = save_dir / BEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt_path best: there is no {path}; pass a file with "
                                    "--ckpt_path or point --training.save_dir at the run.")
        return str(path), load_checkpoint(path)
    if not Path(ckpt_path).is_file():
        return ckpt_path, None
    return str(ckpt_path), load_checkpoint(ckpt_path)


def check_resume_compatible(checkpoint: dict, path, model: torch.nn.Module,
                            datamodule=None, max_epochs=None) -> list:
    """Compare a checkpoint with the model and data module about to be restored.

    Args:
        checkpoint: the loaded checkpoint.
        path: its file, for the messages.
        model: the LightningModule (its ``state_dict`` and ``hparams``).
        datamodule: the LightningDataModule, or None.
        max_epochs: the Trainer's ``max_epochs`` now, compared with the schedule in the
            checkpoint, or None.

    Returns:
        The hyperparameter differences (already warned about, in one warning).

    Raises:
        ValueError: the checkpoint has no ``state_dict``, or parameter names or shapes differ;
            the message names each differing parameter.
    """
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict'). A file with "
                         "only 'model_state_dict' loads with model.load_state_dict(...) instead.")
    differences = hyperparameter_differences(checkpoint.get("hyper_parameters"),
                                             getattr(model, "hparams", None), "model")
    if datamodule is not None:
        differences += hyperparameter_differences(
            checkpoint.get("datamodule_hyper_parameters"), getattr(datamodule, "hparams", None),
            "data")
    differences += schedule_differences(checkpoint, max_epochs)
    mismatches = shape_differences(checkpoint["state_dict"], model.state_dict())
    if mismatches:
        settings = f" Settings that differ: {'; '.join(differences)}." if differences else ""
        raise ValueError(
            f"{path} does not fit this model: {'; '.join(mismatches)}.{settings} Resume with "
            "the checkpoint's model settings, or start a new run in another "
            "--training.save_dir.")
    if differences:
        rank_zero_warn(f"Resuming from {path} with settings that differ from the checkpoint's "
                       "(optimizer and scheduler state, learning rate included, come from the "
                       f"checkpoint): {'; '.join(differences)}.")
    return differences


def schedule_differences(checkpoint: dict, max_epochs) -> list:
    """A cosine schedule planned for another ``max_epochs`` keeps its plan after a resume."""
    schedulers = checkpoint.get("lr_schedulers") or []
    planned = schedulers[0].get("T_max") if schedulers and isinstance(schedulers[0], dict) else None
    if max_epochs in (None, -1) or planned is None or planned == max_epochs:
        return []
    return [f"trainer.max_epochs {planned} -> {max_epochs} (the cosine learning-rate schedule "
            f"keeps T_max={planned} from the checkpoint)"]


def shape_differences(saved: dict, current: dict) -> list:
    """Parameters missing on either side or of another shape, one text per parameter."""
    found = []
    for name in sorted(set(saved) | set(current)):
        if name not in saved:
            found.append(f"{name} {tuple(current[name].shape)} is not in the checkpoint")
        elif name not in current:
            found.append(f"{name} {tuple(saved[name].shape)} is not in the model")
        elif tuple(saved[name].shape) != tuple(current[name].shape):
            found.append(f"{name} is {tuple(saved[name].shape)} in the checkpoint, "
                         f"{tuple(current[name].shape)} now")
    if len(found) > MAX_LISTED:
        found = found[:MAX_LISTED] + [f"and {len(found) - MAX_LISTED} more"]
    return found


def hyperparameter_differences(saved, current, section: str) -> list:
    """``section.key: saved in the checkpoint, current now`` for each differing value."""
    if not saved or current is None:
        return []
    saved, current = dict(saved), dict(current)
    found = []
    for key in sorted(set(saved) | set(current)):
        if key.startswith("_"):
            continue
        before, after = _comparable(saved.get(key)), _comparable(current.get(key))
        if before != after:
            found.append(f"{section}.{key}: {saved.get(key)!r} in the checkpoint, "
                         f"{current.get(key)!r} now")
    return found


def _comparable(value):
    if isinstance(value, (list, tuple)):
        return [_comparable(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value
