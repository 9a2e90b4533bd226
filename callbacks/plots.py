"""Training curves of a run, drawn from its checkpoints into one PNG.

The curves come from the ``train_history`` and ``val_history`` of one checkpoint (the one with
the longest history); a series missing there is filled from the scalar metrics of each
checkpoint file in the folder, one point per file. Six panels: loss, accuracy (in %), IC and
RankIC, learning rate, gate mean (train and val), and a short text summary. The best epoch is a
dashed line in every panel.
"""

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from callbacks.checkpoint_io import atomic_write_bytes
from callbacks.checkpoint_summary import CheckpointSummary, best_epoch, format_percent

log = logging.getLogger(__name__)

CURVES_FILE = "curves.png"
FIGURE_SIZE = (15, 8.5)  # inches; at DPI 100 a 1500 x 850 PNG
DPI = 100
TRAIN_COLOUR, VAL_COLOUR, EXTRA_COLOUR = "tab:blue", "tab:orange", "tab:green"

# (series name, history it is read from, keys tried in order, checkpoint key of the fallback)
_SERIES = (
    ("train_loss", "train", ("loss",), "train_loss"),
    ("val_loss", "val", ("loss",), "val_loss"),
    ("train_accuracy", "train", ("accuracy", "acc"), "train_accuracy"),
    ("val_accuracy", "val", ("accuracy", "acc"), "val_accuracy"),
    ("val_IC", "val", ("IC", "ic"), "val_IC"),
    ("val_RankIC", "val", ("RankIC", "rank_ic"), "val_RankIC"),
    ("lr", "either", ("lr", "learning_rate"), None),
    ("train_gate_mean", "train", ("gate_mean",), None),
    ("val_gate_mean", "val", ("gate_mean",), "gate_mean"),
)


@dataclass
class Curves:
    """Per-epoch series of one run.

    Attributes:
        series: name -> (epochs, values); values may hold NaN where an epoch has none.
        best_epoch: epoch of the best model, or None.
        source: the file (or folder) the curves were read from.
        last_epoch: newest epoch seen, or None.
    """

    series: dict = field(default_factory=dict)
    best_epoch: int | None = None
    source: str = ""
    last_epoch: int | None = None

    def get(self, name: str) -> tuple:
        return self.series.get(name, ([], []))

    @property
    def empty(self) -> bool:
        return not any(epochs for epochs, _ in self.series.values())


def curves_from_summaries(summaries: list, source: str = "") -> Curves:
    """Curves of a run from the summaries of its files (see the module docstring).

    Args:
        summaries: :class:`CheckpointSummary` of one file or of a folder's files.
        source: what to name in the title.
    """
    usable = [s for s in summaries if s.ok and s.kind in ("epoch", "best", "backup", None)]
    curves = Curves(best_epoch=best_epoch(summaries), source=source)
    epochs = [s.epoch for s in usable if s.epoch is not None]
    curves.last_epoch = max(epochs) if epochs else None
    if not usable:
        return curves

    richest = max(usable, key=lambda s: (s.history_length, s.epoch if s.epoch is not None else -1))
    for name, history, keys, fallback_key in _SERIES:
        values = _history_values(richest, history, keys)
        if values:
            curves.series[name] = (_history_epochs(richest, len(values)), values)
        elif fallback_key is not None:
            curves.series[name] = _points_from_files(usable, fallback_key)
    return curves


def plot_curves(curves: Curves, out_path) -> Path:
    """Draw ``curves`` into a PNG at ``out_path``, written crash-safely; returns the path."""
    # A bare Figure draws with Agg and leaves pyplot's global state (and backend) alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI)
    axes = figure.subplots(2, 3)
    panels = axes.ravel()
    _plot_pair(panels[0], curves, "train_loss", "val_loss", "Loss (cross-entropy)", 1.0)
    _plot_pair(panels[1], curves, "train_accuracy", "val_accuracy", "Accuracy (%)", 100.0)
    _plot_ic(panels[2], curves)
    _plot_single(panels[3], curves, "lr", "Learning rate", TRAIN_COLOUR, log_scale=True)
    _plot_pair(panels[4], curves, "train_gate_mean", "val_gate_mean",
               "Gate mean (share of the history summary)", 1.0)
    panels[4].axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    _write_summary(panels[5], curves)
    for panel in panels[:5]:
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.set_xlabel("epoch")
        panel.grid(alpha=0.3)
        if curves.best_epoch is not None:
            panel.axvline(curves.best_epoch, color="grey", linestyle="--", linewidth=1)
    figure.suptitle(f"Training curves: {curves.source}", fontsize=14)
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(buffer.getvalue(), out_path)
    return Path(out_path)


def _plot_pair(axis, curves: Curves, train: str, val: str, title: str, scale: float) -> None:
    drawn = False
    for name, label, colour in ((train, "train", TRAIN_COLOUR), (val, "val", VAL_COLOUR)):
        epochs, values = curves.get(name)
        if _has_values(values):
            axis.plot(epochs, [v * scale for v in values], marker=_marker(epochs), label=label,
                      color=colour)
            drawn = True
    _finish(axis, title, drawn)


def _plot_ic(axis, curves: Curves) -> None:
    drawn = False
    for name, label, colour in (("val_IC", "val IC", VAL_COLOUR),
                                ("val_RankIC", "val RankIC", EXTRA_COLOUR)):
        epochs, values = curves.get(name)
        if _has_values(values):
            axis.plot(epochs, values, marker=_marker(epochs), label=label, color=colour)
            drawn = True
    if drawn:
        axis.axhline(0.0, color="black", linewidth=0.8)
    _finish(axis, "IC and RankIC (validation)", drawn)


def _plot_single(axis, curves: Curves, name: str, title: str, colour: str,
                 log_scale: bool = False) -> None:
    epochs, values = curves.get(name)
    drawn = _has_values(values)
    if drawn:
        axis.plot(epochs, values, marker=_marker(epochs), color=colour)
        if log_scale and all(v > 0 for v in values if _finite(v)):
            axis.set_yscale("log")
    axis.set_title(title)
    if not drawn:
        _no_data(axis)


def _finish(axis, title: str, drawn: bool) -> None:
    axis.set_title(title)
    if drawn:
        axis.legend(loc="best")
    else:
        _no_data(axis)


def _write_summary(axis, curves: Curves) -> None:
    axis.axis("off")
    lines = [f"last epoch: {curves.last_epoch if curves.last_epoch is not None else '-'}",
             (f"best epoch: {curves.best_epoch if curves.best_epoch is not None else '-'} "
             "(dashed line)")]
    shown = (("val_accuracy", "val accuracy", "%"), ("val_loss", "val loss", ".4f"),
             ("val_IC", "val IC", "+.4f"), ("val_RankIC", "val RankIC", "+.4f"))
    for name, label, spec in shown:
        value = _value_at(curves, name, curves.best_epoch)
        if value is not None:
            text = format_percent(value) if spec == "%" else format(value, spec)
            lines.append(f"{label} at best: {text}")
    axis.text(0.02, 0.95, "\n".join(lines), va="top", ha="left", fontsize=12,
              family="monospace", transform=axis.transAxes)
    axis.set_title("Summary")


def _no_data(axis) -> None:
    axis.text(0.5, 0.5, "no data in the checkpoints", ha="center", va="center",
              transform=axis.transAxes, color="grey")


def _value_at(curves: Curves, name: str, epoch: int | None) -> float | None:
    epochs, values = curves.get(name)
    if epoch is None or epoch not in epochs:
        return None
    value = values[epochs.index(epoch)]
    return value if _finite(value) else None


def _history_values(summary: CheckpointSummary, history: str, keys: tuple) -> list:
    sources = {"train": [summary.train_history], "val": [summary.val_history],
               "either": [summary.val_history, summary.train_history]}[history]
    for source in sources:
        for key in keys:
            values = source.get(key)
            if values:
                return [math.nan if value is None else value for value in values]
    return []


def _history_epochs(summary: CheckpointSummary, length: int) -> list:
    """Epochs of a history of ``length`` entries that ends at the file's epoch (a history may
    be cut to its last epochs)."""
    for source in (summary.train_history, summary.val_history):
        epochs = source.get("epoch")
        if epochs and len(epochs) == length and all(_finite(e) for e in epochs):
            return [int(e) for e in epochs]
    last = summary.epoch if summary.epoch is not None else length - 1
    return list(range(last - length + 1, last + 1))


def _points_from_files(summaries: list, key: str) -> tuple:
    points = sorted({s.epoch: s.metrics[key] for s in summaries
                     if s.epoch is not None and key in s.metrics}.items())
    return [epoch for epoch, _ in points], [value for _, value in points]


def _has_values(values: list) -> bool:
    return any(_finite(value) for value in values)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _marker(epochs: list) -> str | None:
    return "o" if len(epochs) <= 30 else None
