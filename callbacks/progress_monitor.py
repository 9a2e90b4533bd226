"""Progress warnings: training loss that stops falling, validation accuracy that stops rising.

Warnings only, never a stop (early stopping is a Trainer callback of its own). A metric is
stale when ``patience`` epochs have passed since its best value; the warning repeats every
further ``patience`` stale epochs, and the count restarts at each new best.
"""

import logging
import math
from dataclasses import dataclass
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.alerts import raise_alert

log = logging.getLogger(__name__)


@dataclass
class _Trend:
    """Best value of one metric, the epoch it came, and epochs since."""

    name: str
    better: str  # "lower" or "higher"
    best: Optional[float] = None
    best_epoch: Optional[int] = None
    stale: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record this epoch's value; True when it is a new best."""
        improved = math.isfinite(value) and (
            self.best is None
            or (value < self.best if self.better == "lower" else value > self.best))
        if improved:
            self.best, self.best_epoch, self.stale = value, epoch, 0
        else:
            self.stale += 1
        return improved

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale}

    def load(self, state: dict) -> None:
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.stale = int(state.get("stale", 0))


class ProgressMonitor(Callback):
    """Warns when ``train_loss`` has not fallen, or ``val_accuracy`` not risen, for
    ``patience`` epochs.

    Args:
        patience: ``training.patience``, epochs without a new best before a warning.

    Raises:
        ValueError: ``patience`` is not an integer >= 1.
    """

    def __init__(self, patience: int = 5):
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"training.patience must be an integer >= 1, got {patience!r}.")
        self.patience = patience
        self.train_loss = _Trend("train_loss", "lower")
        self.val_accuracy = _Trend("val_accuracy", "higher")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update(trainer, self.train_loss, "train_loss_stalled",
                     "Training loss has not fallen", "{:.4f}", 1.0,
                     "Advice: check the learning rate (too high oscillates, too low crawls) "
                     "and the gradient norms (grad_norm); the model may also have converged.")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._update(trainer, self.val_accuracy, "val_accuracy_stalled",
                     "Validation accuracy has not risen", "{:.1f}%", 100.0,
                     "Advice: the model may be overfitting (training loss still falling): "
                     "more regularisation (model.weight_decay, model.dropout) or a lower "
                     "learning rate; the run's best model stays in best_model.pth.")

    def _update(self, trainer: L.Trainer, trend: _Trend, kind: str, headline: str,
                value_format: str, scale: float, advice: str) -> None:
        value = trainer.callback_metrics.get(trend.name)
        if value is None:
            return
        trend.update(float(value), trainer.current_epoch)
        if trend.stale and trend.stale % self.patience == 0 and trend.best is not None:
            best = value_format.format(trend.best * scale)
            raise_alert(trainer, kind,
                        f"⚠ Warning: {headline} for {trend.stale} epochs (best {best} in epoch "
                        f"{trend.best_epoch}; now epoch {trainer.current_epoch}). {advice}")

    def state_dict(self) -> dict:
        return {"train_loss": self.train_loss.state(), "val_accuracy": self.val_accuracy.state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_loss.load(state_dict.get("train_loss", {}))
        self.val_accuracy.load(state_dict.get("val_accuracy", {}))
