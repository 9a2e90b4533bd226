"""Peak memory per epoch, logged as ``peak_memory_gb``, with a warning near the device's limit.

What is measured, per device kind:

* CUDA: the caching allocator's peak reserved memory (what counts towards out-of-memory),
  reset at each epoch start; the limit is the device's total memory;
* MPS: the driver's allocated memory, sampled after every batch; the limit is
  ``torch.mps.recommended_max_memory()``;
* CPU: the process's resident memory, sampled after every batch from ``/proc/self/statm``
  (elsewhere the lifetime peak from ``resource``); the limit is the physical memory, or the
  cgroup's limit when that is lower.
"""

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.alerts import raise_alert

log = logging.getLogger(__name__)

GIB = 1024 ** 3
MEMORY_ADVICE = (
    "Advice: data.batch_size 4-8, data.num_center_nodes 6-8, trainer.accumulate_grad_batches "
    "instead of a larger batch; close other programs on the device."
)


class MemoryMonitor(Callback):
    """Logs ``peak_memory_gb`` (and ``peak_memory_fraction``) per training epoch, validation
    included, and warns above ``warn_fraction`` of the device's memory.

    Args:
        warn_fraction: ``training.memory_warn_fraction``, in (0, 1].

    Raises:
        ValueError: ``warn_fraction`` outside (0, 1].
    """

    def __init__(self, warn_fraction: float = 0.9):
        if not (isinstance(warn_fraction, (int, float)) and 0 < warn_fraction <= 1):
            raise ValueError("training.memory_warn_fraction must be a share in (0, 1], "
                             f"got {warn_fraction!r}.")
        self.warn_fraction = float(warn_fraction)
        self.peak_bytes = 0
        self.total_bytes: Optional[int] = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_bytes = 0
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sample(pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._sample(pl_module.device)

    def _sample(self, device: torch.device) -> None:
        current = used_bytes(device)
        if current is not None:
            self.peak_bytes = max(self.peak_bytes, current)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        self._sample(device)
        if not self.peak_bytes:
            return
        self.total_bytes = device_total_bytes(device)
        pl_module.log("peak_memory_gb", self.peak_bytes / GIB)
        if not self.total_bytes:
            return
        fraction = self.peak_bytes / self.total_bytes
        pl_module.log("peak_memory_fraction", fraction)
        if fraction > self.warn_fraction:
            raise_alert(
                trainer, "high_memory",
                f"⚠ Warning: High memory use: peak {self.peak_bytes / GIB:.2f} GiB of "
                f"{self.total_bytes / GIB:.2f} GiB ({fraction:.0%}) on {device} in epoch "
                f"{trainer.current_epoch} (threshold {self.warn_fraction:.0%}). "
                f"{MEMORY_ADVICE}")


def used_bytes(device: torch.device) -> Optional[int]:
    """Peak (CUDA) or current (MPS, CPU) memory in use on ``device``, in bytes."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    return _resident_bytes()


def device_total_bytes(device: torch.device) -> Optional[int]:
    """The memory available to ``device``'s work, in bytes, or None when unknown."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
        if device.type == "mps":
            return int(torch.mps.recommended_max_memory())
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    limit = _cgroup_limit()
    return min(physical, limit) if limit else physical


def _resident_bytes() -> Optional[int]:
    statm = Path("/proc/self/statm")
    if statm.is_file():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _cgroup_limit() -> Optional[int]:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None
