"""Validation accuracy alerts: very low accuracy, and accuracy that does not beat the label prior.

Two checks per validation epoch (never during the sanity check):

* accuracy below ``min_val_accuracy`` percent (default half of chance, ``50 / num_classes``):
  ``⚠ Warning: Very low validation accuracy: {acc:.1f}%`` with the spec's advice;
* accuracy not above the share of the most frequent class among the validation labels (what
  always answering that class would score), from the second validation epoch on: an untrained
  model sits at chance in its first epoch, and that is no news.
"""

import logging
import math
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.alerts import raise_alert

log = logging.getLogger(__name__)

LOW_ACCURACY_WARNING = "⚠ Warning: Very low validation accuracy: {acc:.1f}%"
LOW_ACCURACY_ADVICE = (
    "Likely causes: a learning rate too high, overfitting, too little capacity, label "
    "problems. Advice: lower the learning rate, add regularisation (model.weight_decay), "
    "check the label distribution."
)
PRIOR_WARMUP_EPOCHS = 1


class ValidationAccuracyMonitor(Callback):
    """Warns on very low validation accuracy and on accuracy no better than the majority class.

    Args:
        min_val_accuracy: threshold in percent (``training.min_val_accuracy``); None: half of
            chance, ``50 / num_classes``.
        num_classes: classes of the labels; None reads ``num_classes`` from the module's
            hyperparameters (or the data module's).

    Raises:
        ValueError: ``min_val_accuracy`` outside [0, 100].
    """

    def __init__(self, min_val_accuracy: Optional[float] = None,
                 num_classes: Optional[int] = None):
        if min_val_accuracy is not None and not 0 <= min_val_accuracy <= 100:
            raise ValueError("training.min_val_accuracy must be a percentage in [0, 100] or "
                             f"null (half of chance), got {min_val_accuracy!r}.")
        self.min_val_accuracy = min_val_accuracy
        self.num_classes = num_classes
        self.validations = 0
        self._label_counts: Optional[torch.Tensor] = None

    def threshold(self, num_classes: int) -> float:
        """The low-accuracy threshold in percent."""
        if self.min_val_accuracy is not None:
            return float(self.min_val_accuracy)
        return 50.0 / num_classes

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._label_counts = None

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if trainer.sanity_checking:
            return
        samples = batch if isinstance(batch, (list, tuple)) else [batch]
        for sample in samples:
            if isinstance(sample, dict) and torch.is_tensor(sample.get("label")):
                self._count(sample["label"])

    def _count(self, label: torch.Tensor) -> None:
        label = label.detach().reshape(-1).cpu()
        counts = torch.bincount(label[label >= 0])
        if self._label_counts is None:
            self._label_counts = counts
            return
        size = max(len(counts), len(self._label_counts))
        self._label_counts = (torch.nn.functional.pad(self._label_counts,
                                                      (0, size - len(self._label_counts)))
                              + torch.nn.functional.pad(counts, (0, size - len(counts))))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val_accuracy" not in trainer.callback_metrics:
            return
        accuracy = 100.0 * float(trainer.callback_metrics["val_accuracy"])
        self.validations += 1
        if not math.isfinite(accuracy):
            return
        num_classes = self._classes(trainer, pl_module)
        if num_classes and accuracy < self.threshold(num_classes):
            raise_alert(trainer, "low_val_accuracy",
                        f"{LOW_ACCURACY_WARNING.format(acc=accuracy)} (epoch "
                        f"{trainer.current_epoch}; threshold {self.threshold(num_classes):.1f}%"
                        f" for {num_classes} classes). {LOW_ACCURACY_ADVICE}")
        if self.validations > PRIOR_WARMUP_EPOCHS:
            self._check_prior(trainer, accuracy)

    def _check_prior(self, trainer: L.Trainer, accuracy: float) -> None:
        counts = self._label_counts
        if counts is None or int(counts.sum()) == 0:
            return
        majority = int(counts.argmax())
        share = 100.0 * float(counts[majority]) / float(counts.sum())
        if accuracy <= share:
            raise_alert(
                trainer, "val_accuracy_below_majority",
                f"⚠ Warning: Validation accuracy {accuracy:.1f}% does not beat the most "
                f"frequent class (class {majority}, {share:.1f}% of the validation labels; "
                f"epoch {trainer.current_epoch}): always answering that class would score as "
                f"well. {LOW_ACCURACY_ADVICE}")

    def _classes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[int]:
        if self.num_classes:
            return self.num_classes
        for source in (pl_module, getattr(trainer, "datamodule", None)):
            hparams = getattr(source, "hparams", None) or {}
            if hparams.get("num_classes"):
                return int(hparams["num_classes"])
        return len(self._label_counts) if self._label_counts is not None else None

    def state_dict(self) -> dict:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self.validations = int(state_dict.get("validations", 0))
