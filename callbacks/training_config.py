"""The ``training:`` section of the configuration, and the callbacks it switches on."""

import logging
from dataclasses import dataclass
from typing import Optional

from callbacks.checkpoint import CheckpointManager
from callbacks.epoch_summary import EpochSummary
from callbacks.fit_report import FitReport
from callbacks.gate_statistics import GateStatistics
from callbacks.health import health_callbacks
from callbacks.prediction_writer import PredictionFileWriter
from callbacks.preflight import Preflight

log = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    """Application settings around the Trainer: where files go and what is watched.

    Attributes:
        save_dir: folder of every checkpoint file.
        save_best_only: write ``best_model.pth`` only when the monitored metric improves.
        save_every_epoch: write ``epoch_{n}.pth`` after every epoch.
        keep_last: how many of the newest ``epoch_{n}.pth`` files are kept.
        monitor: metric that decides the best model.
        mode: ``max`` or ``min``: whether a larger monitored value is better.
        history_max_epochs: epochs of history kept in each checkpoint (None: all).
        nan_policy: on a NaN/Inf loss or gradient: ``skip`` the optimizer step, ``rollback``
            to the newest finite epoch checkpoint with half the learning rate, or ``stop``.
        max_consecutive_nan: skipped steps in a row after which training stops.
        grad_norm_warn: warn when the total gradient norm (before clipping) exceeds this.
        min_val_accuracy: warn below this validation accuracy in percent (None: half of
            chance, 50 / num_classes).
        oom_policy: on out-of-memory: ``stop``, or ``split`` the batch in halves and retry.
        memory_warn_fraction: warn when peak memory exceeds this share of the device's.
        patience: epochs without progress (train loss or val accuracy) before a warning.
        preflight: run the checklist (disk, memory, settings, data) when fit starts.
        preflight_dry_run: include a one-batch forward and backward in the preflight.
        min_free_disk_gb: free disk demanded when no checkpoint-size estimate can be made.
        report: print the after-fit report (files, best model, alerts) and write curves.png.
        predictions_path: file ``predict`` writes (``.csv`` or ``.parquet``).
    """

    save_dir: str = "./checkpoints"
    save_best_only: bool = True
    save_every_epoch: bool = True
    keep_last: int = 5
    monitor: str = "val_accuracy"
    mode: str = "max"
    history_max_epochs: Optional[int] = None
    nan_policy: str = "skip"
    max_consecutive_nan: int = 10
    grad_norm_warn: float = 100.0
    min_val_accuracy: Optional[float] = None
    oom_policy: str = "stop"
    memory_warn_fraction: float = 0.9
    patience: int = 5
    preflight: bool = True
    preflight_dry_run: bool = False
    min_free_disk_gb: float = 10.0
    report: bool = True
    predictions_path: str = "predictions.csv"


def build_callbacks(config: TrainingConfig) -> list:
    """The product's own callbacks, configured from the ``training:`` section.

    Order matters: statistics are logged before the summary line reads them, and callbacks
    that save files come last (Lightning also runs checkpoint callbacks after the others).
    """
    callbacks = [GateStatistics(), EpochSummary()]
    callbacks += health_callbacks(config)  # NaN/Inf, gradients, OOM, memory, accuracy, alerts
    if config.preflight:
        # First, so that a failed check stops fit before any other callback acts.
        callbacks.insert(0, Preflight(config.save_dir, config.keep_last, config.min_free_disk_gb,
                                      config.preflight_dry_run))
    callbacks.append(PredictionFileWriter(config.predictions_path))
    callbacks.append(CheckpointManager(config))  # epoch, best, error and NaN files
    if config.report:
        callbacks.append(FitReport(config.save_dir))
    return callbacks
