"""The after-training part of the user's checklist, logged when fit ends.

The report says which checkpoint files the run left and whether each loads (``weights_only``),
the best model's path and metrics, the disk the files use and what is left, the alerts the
health callbacks raised, and how to back the best model up. It also writes ``curves.png`` into
``save_dir``.
"""

import logging
import math
import time
from collections import Counter
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.checkpoint_io import free_disk_bytes
from callbacks.checkpoint_summary import (
    CheckpointSummary,
    format_number,
    format_percent,
    format_size,
    summarize_folder,
)
from callbacks.plots import CURVES_FILE, curves_from_summaries, plot_curves

log = logging.getLogger(__name__)

ALERT_PREFIX = "alert"
BACKUP_COMMAND = "python ckpt.py backup"


class FitReport(Callback):
    """Logs the after-fit report and writes ``curves.png`` once fit has finished.

    It runs in ``teardown``, after every callback's ``on_fit_end``, so files written at the
    very end of fit are included. A fit that raised gets no report (its error file says more).

    Args:
        save_dir: folder of the checkpoint files.
        write_curves: also write ``curves.png`` into ``save_dir``.
    """

    def __init__(self, save_dir, write_curves: bool = True):
        self.save_dir = Path(save_dir)
        self.write_curves = write_curves
        self.started: float | None = None
        self.lines: list = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.time()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.started is None:
            return
        self.lines = report_lines(self.save_dir, self.started, collect_alerts(trainer),
                                  self.write_curves)
        log.info("\n".join(self.lines))


def report_lines(save_dir, since: float, alerts: dict, write_curves: bool = True) -> list:
    """Lines of the report of the files in ``save_dir``.

    Args:
        save_dir: folder of the checkpoint files.
        since: start of the run (epoch seconds); files modified since were written by it.
        alerts: alert name -> count (see :func:`collect_alerts`).
        write_curves: write ``curves.png`` into ``save_dir``.
    """
    save_dir = Path(save_dir)
    summaries = summarize_folder(save_dir)
    lines = [f"After-fit report: {save_dir}"]
    lines += _file_lines(summaries, since)
    lines += _best_lines(summaries)
    used = sum(summary.size for summary in summaries)
    lines.append(f"  Disk: {format_size(used)} in {len(summaries)} file(s); "
                 f"{format_size(free_disk_bytes(save_dir))} free")
    lines.append("  Alerts: " + (", ".join(f"{name} ×{count}" for name, count in alerts.items())
                                 if alerts else "none"))
    if write_curves:
        lines.append(_curves_line(summaries, save_dir))
    best = next((s for s in summaries if s.kind == "best" and s.ok), None)
    if best is not None:
        name = f"best_epoch{best.epoch}_{time.strftime('%Y%m%d-%H%M%S')}"
        lines.append(f"  Back up the best model: {BACKUP_COMMAND} {best.path} --name {name}")
    return lines


def collect_alerts(trainer: L.Trainer) -> dict:
    """Alert counts the health callbacks expose, or an empty dict.

    Read from ``trainer.callback_metrics`` keys starting with ``alert`` and from an
    ``alert_counts`` (mapping) or ``alerts`` (mapping of counts, or a list of alerts) attribute
    of any callback, or the ``counts`` mapping of a callback whose class name says ``Alert``
    (the alert register). Anything else is ignored.
    """
    counts = Counter()
    for key, value in getattr(trainer, "callback_metrics", {}).items():
        if str(key).startswith(ALERT_PREFIX):
            number = _count(value)
            if number:
                counts[str(key)] += number
    for callback in getattr(trainer, "callbacks", []):
        exposed = getattr(callback, "alert_counts", None)
        if exposed is None:
            exposed = getattr(callback, "alerts", None)
        if exposed is None and "alert" in type(callback).__name__.lower():
            exposed = getattr(callback, "counts", None)
        if isinstance(exposed, dict):
            for name, value in exposed.items():
                number = _count(value)
                if number:
                    counts[str(name)] += number
        elif isinstance(exposed, (list, tuple)) and exposed:
            counts[type(callback).__name__] += len(exposed)
    return dict(counts)


def _file_lines(summaries: list, since: float) -> list:
    written = [s for s in summaries if _modified_since(s.path, since)]
    damaged = [s for s in summaries if not s.ok]
    kinds = Counter(s.kind or "other" for s in summaries)
    lines = [(f"  Files: {len(summaries)} checkpoint file(s) "
             f"({', '.join(f'{count} {kind}' for kind, count in kinds.items()) or 'none'}); "
             f"{len(written)} written by this run; {len(summaries) - len(damaged)} verified ok, "
             f"{len(damaged)} damaged")]
    lines += [f"    ✘ {s.path.name}: {s.problem}" for s in damaged]
    return lines


def _best_lines(summaries: list) -> list:
    best: CheckpointSummary | None = next(
        (s for s in summaries if s.kind == "best" and s.ok), None)
    if best is None:
        return ["  Best model: none written"]
    metrics = best.metrics
    return [(f"  Best model: {best.path} (epoch {best.epoch}): val acc "
            f"{format_percent(metrics.get('val_accuracy'))}, val loss "
            f"{format_number(metrics.get('val_loss'), '.4f')}, IC "
            f"{format_number(metrics.get('val_IC'), '+.4f')}, RankIC "
            f"{format_number(metrics.get('val_RankIC'), '+.4f')}")]


def _curves_line(summaries: list, save_dir: Path) -> str:
    curves = curves_from_summaries(summaries, source=str(save_dir))
    if curves.empty:
        return "  Curves: not written (no readable checkpoint with metrics)"
    try:
        path = plot_curves(curves, save_dir / CURVES_FILE)
    except (OSError, ValueError, RuntimeError) as error:
        return f"  Curves: not written ({type(error).__name__}: {error})"
    return f"  Curves: {path}"


def _modified_since(path: Path, since: float) -> bool:
    try:
        return path.stat().st_mtime >= since - 1.0
    except OSError:
        return False


def _count(value) -> int:
    if isinstance(value, (list, tuple)):
        return len(value)
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        return 0
    return int(number) if math.isfinite(number) and number > 0 else 0
