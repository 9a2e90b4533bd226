"""Read checkpoint files safely and summarise them for people.

Every file is opened with ``torch.load(..., weights_only=True)``: a damaged file (truncated, a
text file, an empty file) or a hostile one (a pickle that would run code) becomes a summary with
``ok`` False and a one-line reason, never an exception and never code execution.

A file is ``ok`` when it loads, is a dict and, for files that carry a model (epoch, best and
backup files), holds a model state whose floating-point values are all finite.
"""

import logging
import math
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from callbacks.checkpoint_files import KINDS, classify
from callbacks.checkpoint_io import TEMPORARY_SUFFIX

log = logging.getLogger(__name__)

# Names other than ours that still look like checkpoints, so that verify and list report them.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
MODEL_KEYS = ("model_state_dict", "state_dict")
KINDS_WITH_MODEL = ("epoch", "best", "backup", "preempt")
METRIC_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_IC",
               "val_RankIC", "best_val_acc", "gate_mean", "gate_std")
# Top-level keys whose dict or text value is error or warning information.
_INFO_KEY = re.compile(r"error|warning|exception|nan_info|preempt_info|alert", re.IGNORECASE)
_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# torch.save writes a zip archive; files of the legacy format start with a pickle protocol byte.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"


class CheckpointLoadError(Exception):
    """A file could not be read as a checkpoint; the message is a one-line reason."""


@dataclass
class CheckpointSummary:
    """What a person wants to know about one checkpoint file.

    Attributes:
        path: the file.
        kind: ``epoch``, ``best``, ``error``, ``val_error``, ``nan``, ``backup``, ``preempt`` or
            None for a name that is not one of ours.
        epoch: the ``epoch`` key (0-based), else the epoch in the file name, else None.
        size: bytes on disk.
        problem: why the file is damaged; None when it is ok.
        metrics: the scalar keys of ``METRIC_KEYS`` present in the file, as floats.
        info: error or warning information found in the file (key -> value).
        train_history: ``train_history`` dict of per-epoch lists (empty when absent).
        val_history: ``val_history`` dict of per-epoch lists (empty when absent).
    """

    path: Path
    kind: str | None
    epoch: int | None
    size: int
    problem: str | None = None
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    train_history: dict = field(default_factory=dict)
    val_history: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "damaged"

    @property
    def history_length(self) -> int:
        return max((len(values) for values in self.train_history.values()
                    if isinstance(values, list)), default=0)


def load_checkpoint(path) -> dict:
    """Load a checkpoint on the CPU with ``weights_only=True``.

    Raises:
        CheckpointLoadError: the file is missing, damaged, not a dict, or holds objects other
            than tensors and plain data; the message says which in one line.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointLoadError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointLoadError("empty file")
    with open(path, "rb") as handle:
        head = handle.read(len(_ZIP_MAGIC))
    if not head.startswith((_ZIP_MAGIC, _PICKLE_PROTOCOL)):
        raise CheckpointLoadError("not a torch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # mmap leaves tensors on disk until read; only the zip format supports it.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True,
                                    mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - any failure to load means "damaged"
        raise CheckpointLoadError(_load_problem(error)) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointLoadError(f"not a checkpoint: holds a {type(checkpoint).__name__}, "
                                  f"not a dict")
    return checkpoint


def summarize(path, checkpoint: dict | None = None) -> CheckpointSummary:
    """Summary of one file; loads it unless ``checkpoint`` is given. Never raises for a bad file.

    Args:
        path: the checkpoint file.
        checkpoint: its content when already loaded.
    """
    path = Path(path)
    kind, name_epoch = classify(path)
    size = path.stat().st_size if path.is_file() else 0
    summary = CheckpointSummary(path=path, kind=kind, epoch=name_epoch, size=size)
    if checkpoint is None:
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointLoadError as error:
            summary.problem = str(error)
            return summary

    epoch = checkpoint.get("epoch")
    if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
        summary.epoch = int(epoch)
    summary.metrics = {key: _as_float(checkpoint[key]) for key in METRIC_KEYS
                       if _as_float(checkpoint.get(key)) is not None}
    summary.info = error_info(checkpoint)
    summary.train_history = _history(checkpoint.get("train_history"))
    summary.val_history = _history(checkpoint.get("val_history"))
    summary.problem = _content_problem(checkpoint, kind)
    return summary


def checkpoint_paths(folder) -> list:
    """Files of ``folder`` that are, or look like, checkpoints, in reading order.

    Epoch-numbered files come first by epoch (epoch, then its error and NaN files), then the
    best model, backups and any other ``.pth``/``.pt``/``.ckpt`` file by name. Temporary files
    of interrupted writes are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if not path.is_file() or path.name.endswith(TEMPORARY_SUFFIX):
            continue
        kind, epoch = classify(path)
        if kind is None and path.suffix not in CHECKPOINT_SUFFIXES:
            continue
        kind_order = KINDS.index(kind) if kind is not None else len(KINDS)
        epoch_order = epoch if epoch is not None else math.inf
        found.append((epoch_order, kind_order, path.name, path))
    return [path for *_, path in sorted(found)]


def summarize_folder(folder) -> list:
    """:func:`summarize` of every file :func:`checkpoint_paths` returns."""
    return [summarize(path) for path in checkpoint_paths(folder)]


def best_epoch(summaries: list) -> int | None:
    """Epoch of the best model: that of an ok ``best_model.pth``, else the epoch file with the
    highest validation accuracy, else None."""
    for summary in summaries:
        if summary.kind == "best" and summary.ok and summary.epoch is not None:
            return summary.epoch
    scored = [(summary.metrics["val_accuracy"], summary.epoch) for summary in summaries
              if summary.ok and summary.kind == "epoch" and "val_accuracy" in summary.metrics]
    return max(scored)[1] if scored else None


def error_info(checkpoint: dict) -> dict:
    """Error or warning information of an error or NaN file: every top-level key whose name
    speaks of an error, warning, exception or alert and whose value is a dict or text."""
    info = {}
    for key, value in checkpoint.items():
        if not isinstance(key, str) or not _INFO_KEY.search(key):
            continue
        if isinstance(value, (dict, str)) and value:
            info[key] = value
    return info


def progress_lines(summary: CheckpointSummary) -> list:
    """The user's progress print of one checkpoint, then its error or warning information."""
    lines = [(f"File:               {summary.path} ({summary.kind or 'unknown kind'}, "
             f"{format_size(summary.size)})")]
    if not summary.ok:
        return lines + [f"Status:             damaged: {summary.problem}"]
    metrics = summary.metrics
    lines += [
        f"Epoch:              {summary.epoch if summary.epoch is not None else '-'}",
        f"Train loss:         {format_number(metrics.get('train_loss'), '.4f')}",
        f"Train accuracy:     {format_percent(metrics.get('train_accuracy'))}",
        f"Val loss:           {format_number(metrics.get('val_loss'), '.4f')}",
        f"Val accuracy:       {format_percent(metrics.get('val_accuracy'))}",
        f"Best val accuracy:  {format_percent(metrics.get('best_val_acc'))}",
    ]
    if "val_IC" in metrics or "val_RankIC" in metrics:
        lines.append(f"Val IC / RankIC:    {format_number(metrics.get('val_IC'), '+.4f')} / "
                     f"{format_number(metrics.get('val_RankIC'), '+.4f')}")
    if "gate_mean" in metrics:
        lines.append(f"Gate mean / std:    {format_number(metrics.get('gate_mean'), '.3f')} / "
                     f"{format_number(metrics.get('gate_std'), '.3f')}")
    for key, value in summary.info.items():
        lines.append(f"{key}:")
        lines += _info_lines(value, indent="  ")
    return lines


def format_size(size: float) -> str:
    """``1.2 MB`` style, base 1024."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def format_number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_percent(fraction: float | None) -> str:
    """An accuracy stored as a fraction 0..1, shown in percent."""
    return "-" if fraction is None else f"{100.0 * fraction:.2f}%"


def _info_lines(value, indent: str) -> list:
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            text = str(item)
            if "\n" in text.strip():
                lines.append(f"{indent}{key}:")
                lines += [f"{indent}  {line}" for line in text.rstrip().splitlines()]
            else:
                lines.append(f"{indent}{key}: {text}")
        return lines
    return [f"{indent}{line}" for line in str(value).rstrip().splitlines()]


def _load_problem(error: Exception) -> str:
    text = str(error)
    blocked = _BLOCKED_GLOBAL.search(text)
    if blocked:
        return f"refused: holds code, not only tensors and data ({blocked.group(1)})"
    if "Weights only load failed" in text:
        return "refused: holds objects other than tensors and plain data"
    if "zip archive" in text or "central directory" in text or isinstance(error, EOFError):
        return "truncated or corrupt file"
    return f"not a torch checkpoint ({type(error).__name__})"


def _content_problem(checkpoint: dict, kind: str | None) -> str | None:
    if kind not in KINDS_WITH_MODEL:
        return None
    state = next((checkpoint[key] for key in MODEL_KEYS if key in checkpoint), None)
    if not isinstance(state, dict):
        return f"not a checkpoint: no {' or '.join(MODEL_KEYS)}"
    for name, tensor in state.items():
        if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                and not bool(torch.isfinite(tensor).all())):
            return f"non-finite values in model weight {name}"
    return None


def _history(value) -> dict:
    if not isinstance(value, dict):
        return {}
    return {key: [_as_float(item) for item in items] for key, items in value.items()
            if isinstance(key, str) and isinstance(items, (list, tuple))}


def _as_float(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
