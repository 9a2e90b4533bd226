"""Per-epoch statistics of the model's node gate, for training and validation.

The gate ``g`` of a node is the share of its history summary in the fused vector
(``g·temporal + (1−g)·embedding``). Logged each epoch:

* ``gate_mean``, ``gate_std``, ``favor_time_ratio`` (share of nodes with ``g > 0.5``) over the
  validation epoch, every node of every day with input: the numbers written into checkpoints;
* ``train_gate_mean``, ``train_gate_std``, ``train_favor_time_ratio`` over the training epoch.
"""

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

FAVOR_TIME_THRESHOLD = 0.5


class _GateAccumulator:
    """Running count, sum, sum of squares and count above 0.5 of gate values."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.above = 0

    def update(self, gate: torch.Tensor) -> None:
        gate = gate.detach().double()
        # A step with a NaN/Inf loss (skipped by the NaN guard) must not turn the epoch NaN.
        gate = gate[torch.isfinite(gate)]
        self.count += gate.numel()
        self.total += float(gate.sum())
        self.total_sq += float((gate ** 2).sum())
        self.above += int((gate > FAVOR_TIME_THRESHOLD).sum())

    def summary(self) -> dict:
        """Mean, population std and share above 0.5; empty when nothing was seen."""
        if self.count == 0:
            return {}
        mean = self.total / self.count
        variance = max(self.total_sq / self.count - mean ** 2, 0.0)
        return {"gate_mean": mean, "gate_std": variance ** 0.5,
                "favor_time_ratio": self.above / self.count}


class GateStatistics(Callback):
    """Collects the ``gate`` of each step's outputs and logs its statistics per epoch."""

    def __init__(self):
        self._train = _GateAccumulator()
        self._val = _GateAccumulator()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train.reset()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val.reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(outputs, dict) and "gate" in outputs:
            self._train.update(outputs["gate"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if isinstance(outputs, dict) and "gate" in outputs:
            self._val.update(outputs["gate"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, value in self._train.summary().items():
            pl_module.log(f"train_{name}", value)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in self._val.summary().items():
            pl_module.log(name, value)
