"""One log line per epoch with the numbers users judge a run by."""

import logging
import math

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

log = logging.getLogger(__name__)

SUMMARY_METRICS = (
    ("train_loss", "train loss {:.4f}"),
    ("train_accuracy", "train acc {:.1%}"),
    ("val_loss", "val loss {:.4f}"),
    ("val_accuracy", "val acc {:.1%}"),
    ("val_IC", "val IC {:+.4f}"),
    ("val_RankIC", "val RankIC {:+.4f}"),
    ("gate_mean", "gate {:.3f}"),
)


class EpochSummary(Callback):
    """Logs ``Epoch n: train loss .., train acc .., val loss .., val acc .., IC, RankIC``.

    The progress bar redraws in place; this line stays in the terminal and in log files.
    """

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(summary_line(trainer.current_epoch, trainer.callback_metrics))


def summary_line(epoch: int, metrics: dict) -> str:
    """``Epoch {epoch}: name value, ...`` for the metrics present and finite."""
    parts = []
    for key, template in SUMMARY_METRICS:
        if key in metrics:
            value = float(metrics[key])
            parts.append(template.format(value) if math.isfinite(value) else f"{key} {value}")
    return f"Epoch {epoch}: " + ", ".join(parts)
