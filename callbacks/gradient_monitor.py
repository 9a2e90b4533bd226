"""The total gradient norm of every optimizer step, logged before clipping, and its alert.

``on_before_optimizer_step`` runs after backward and before the Trainer clips, so the norm
read there is the one clipping acts on. Under 16-bit mixed precision Lightning has already
unscaled the gradients at that point, except for optimizers that unscale inside their own
``step`` (fused ones); for those the norm is divided by the scaler's scale here.
"""

import logging
import math
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from callbacks.alerts import raise_alert

log = logging.getLogger(__name__)

LARGE_GRAD_WARNING = "⚠ Warning: Very large gradient norm: {norm:.1f}"
LARGE_GRAD_ADVICE = (
    "Likely causes: a learning rate too high, a network too deep, a poor activation. "
    "The Trainer clips the norm (gradient_clip_val, max_grad_norm=1.0); lower "
    "model.learning_rate if this repeats."
)


def gradient_norm(optimizer: torch.optim.Optimizer, trainer: Optional[L.Trainer] = None
                  ) -> Optional[float]:
    """Euclidean norm of all gradients of ``optimizer``'s parameters; None when none has one.

    ``sqrt(sum_p ||grad_p||^2)``, summed in float64 so that large finite gradients do not
    overflow: the result is non-finite exactly when some gradient entry is.
    """
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
             for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not norms:
        return None
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    scale = _pending_scale(optimizer, trainer)
    return total / scale if scale else total


def _pending_scale(optimizer, trainer) -> Optional[float]:
    """The AMP scale still on the gradients (fused optimizers unscale inside ``step``)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    return float(scaler.get_scale())


class GradientNormMonitor(Callback):
    """Logs ``grad_norm`` at every optimizer step; warns above ``warn_above`` once per epoch.

    Every step above the threshold is counted as a ``large_grad_norm`` alert; the warning text
    shows for the first of each epoch, and the epoch's count and largest norm are reported when
    the epoch ends.

    Args:
        warn_above: the ``training.grad_norm_warn`` threshold (pre-clip norm).

    Raises:
        ValueError: ``warn_above`` is not a positive number.
    """

    def __init__(self, warn_above: float = 100.0):
        if not (isinstance(warn_above, (int, float)) and warn_above > 0):
            raise ValueError(
                f"training.grad_norm_warn must be a positive number, got {warn_above!r}.")
        self.warn_above = float(warn_above)
        self.epoch_count = 0
        self.epoch_largest = 0.0
        self.last_norm: Optional[float] = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_count = 0
        self.epoch_largest = 0.0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        norm = gradient_norm(optimizer, trainer)
        self.last_norm = norm
        if norm is None:
            return
        pl_module.log("grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)
        if math.isfinite(norm) and norm > self.warn_above:
            self._large(trainer, norm)

    def _large(self, trainer: L.Trainer, norm: float) -> None:
        self.epoch_count += 1
        self.epoch_largest = max(self.epoch_largest, norm)
        message = (f"{LARGE_GRAD_WARNING.format(norm=norm)} (epoch {trainer.current_epoch}, "
                   f"step {trainer.global_step}; threshold {self.warn_above:g}). "
                   f"{LARGE_GRAD_ADVICE}")
        raise_alert(trainer, "large_grad_norm", message, warn=self.epoch_count == 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch_count:
            rank_zero_info(
                f"Epoch {trainer.current_epoch}: {self.epoch_count} step(s) with a gradient "
                f"norm above {self.warn_above:g} (largest {self.epoch_largest:.1f}).")
