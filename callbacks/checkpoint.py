"""Checkpoint files of a fit: every epoch, the best model, errors and NaN; crash-safe, resumable.

Numbering: epochs count from 0, as Lightning's progress bar and ``trainer.current_epoch`` do.
``epoch_{n}.pth`` is written when epoch ``n`` closes (after its validation), its ``epoch`` key is
``n``, and ``--ckpt_path epoch_{n}.pth`` continues with epoch ``n + 1``. Error and NaN files carry
the number of the epoch that was running.

Files in ``training.save_dir`` (names from :mod:`callbacks.checkpoint_files`):

* ``epoch_{n}.pth``: a full Lightning checkpoint (``--ckpt_path`` resumes from it) plus the user's
  keys: ``epoch``, ``model_state_dict`` (the bare model), ``optimizer_state_dict``,
  ``scheduler_state_dict`` (None without a scheduler), ``train_loss``, ``train_accuracy``,
  ``val_loss``, ``val_accuracy``, ``val_IC``, ``val_RankIC``, ``gate_mean``, ``gate_std`` (floats;
  accuracies are fractions in [0, 1]; NaN when not computed), ``train_history`` and
  ``val_history`` (per-epoch lists, see :class:`MetricHistory`), ``best_val_acc``; and ours:
  ``run_id``, ``best`` (monitor, mode, score and epoch of ``best_model.pth``). The aliases share
  storage with Lightning's keys, so they cost no extra bytes. Only the ``training.keep_last``
  newest (by number) written by this run are kept; older ones are deleted after the new file is on
  disk, never the file the run resumed from.
* ``best_model.pth``: the same content, when ``training.monitor`` improves in ``training.mode``
  (with ``training.save_best_only: false``: after every epoch, as in Keras).
* ``epoch_{n}_error.pth`` / ``epoch_{n}_val_error.pth``: the state when training / validation
  raised, with ``error_info`` (type, message, traceback, global step, batch index); the
  exception then goes on unchanged.
* ``epoch_{n}_nan.pth``: written on request (:meth:`CheckpointManager.save_nan_checkpoint`) with
  the last finite weights and ``nan_info``; never best, never rotated.
* ``epoch_{n}_preempt.pth``: written on request (:meth:`CheckpointManager.save_preempt_checkpoint`,
  from :class:`~callbacks.preemption.PreemptionHandler`) at a step boundary after SIGTERM or
  SIGUSR1, with ``preempt_info`` and the training sampler's position: ``--ckpt_path last`` takes
  it when it is newer than the newest epoch file, and the run continues with the next batch. Its
  metric keys are those of the last complete epoch. It is deleted once a later epoch file or
  preemption file of the run is on disk.

Every file goes through :func:`atomic_save`; a failed write (disk full, permission, size limit)
is logged with the free space and training goes on. Files of other runs (another ``run_id``)
are never overwritten nor deleted. The random state of torch, NumPy and Python is saved and set
again at the first training batch after each epoch end, in uninterrupted and resumed runs alike,
so a resumed deterministic run reproduces the uninterrupted one exactly. A ``ReduceLROnPlateau``
step that Lightning takes after the epoch-end hook is replayed on resume.

Several processes (DDP): rank 0 writes and prunes every file except error files; the run id,
the refusal of another run's files and the bookkeeping (rotation, best) are rank 0's, shared
with the other ranks; the files hold every rank's random state, each rank resumes with its own.
An error checkpoint is written by the rank that failed, and only once: a rank whose collective
fails because another rank died finds the failing rank's file for the same step and leaves it.
"""

import logging
import math
import traceback
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint_files import (
    BEST_FILE,
    classify,
    epoch_file,
    error_file,
    files_to_prune,
    nan_file,
    preempt_file,
    progress_key,
    val_error_file,
)
from callbacks.checkpoint_io import atomic_save, free_disk_bytes, remove_temporary_files
from callbacks.checkpoint_state import (
    MetricHistory,
    capture_rng_state,
    gather_rng_states,
    metric_value,
    plain,
    restore_rng_state,
    restore_sampler_position,
    rng_state_for_rank,
    sampler_position,
    unloadable_values,
)
from callbacks.preemption import find_preemption_handler
from callbacks.resume import load_checkpoint, read_summary

if TYPE_CHECKING:
    from callbacks.training_config import TrainingConfig

log = logging.getLogger(__name__)

STATE_VERSION = 1
MODES = ("max", "min")
# The user's top-level metric keys and the logged metric each one copies.
USER_METRICS = {
    "train_loss": "train_loss",
    "train_accuracy": "train_accuracy",
    "val_loss": "val_loss",
    "val_accuracy": "val_accuracy",
    "val_IC": "val_IC",
    "val_RankIC": "val_RankIC",
    "gate_mean": "gate_mean",
    "gate_std": "gate_std",
}
VALIDATION_METRICS = frozenset(name for name in USER_METRICS.values()
                               if name.startswith(("val_", "gate_")))
ERROR_STAGES = ("train", "val")
EPOCH_KINDS = ("epoch", "error", "val_error", "nan", "preempt")
DAMAGED_SUFFIX = ".damaged"


class ForeignCheckpointError(RuntimeError):
    """``training.save_dir`` holds files of another run that this run would overwrite."""


class CheckpointManager(Checkpoint):
    """Writes, rotates and restores the checkpoint files described in the module docstring.

    Args:
        config: the ``training:`` section (save_dir, save_best_only, save_every_epoch,
            keep_last, monitor, mode, history_max_epochs).

    Raises:
        ValueError: ``mode`` is not ``max``/``min`` or ``keep_last`` is below 1.
    """

    def __init__(self, config: "TrainingConfig"):
        if config.mode not in MODES:
            raise ValueError(f"training.mode must be one of {MODES}, got {config.mode!r}.")
        if config.keep_last < 1:
            raise ValueError(f"training.keep_last must be >= 1, got {config.keep_last}; "
                             "set training.save_every_epoch: false to write no epoch files.")
        self.save_dir = Path(config.save_dir)
        self.save_best_only = config.save_best_only
        self.save_every_epoch = config.save_every_epoch
        self.keep_last = config.keep_last
        self.monitor = config.monitor
        self.mode = config.mode
        self.history = MetricHistory(config.history_max_epochs)
        # Lightning's ``ckpt_path="best"`` and its spawn launchers read and set this attribute.
        self.best_model_path = ""
        self.run_id: str | None = None
        self._rotation: list = []
        self._ours: set = set()
        self._best_score: float | None = None
        self._best_epoch: int | None = None
        self._best_val_acc = math.nan
        self._latest = {key: math.nan for key in USER_METRICS}
        self._last_epoch = -1
        self._restored: dict | None = None
        self._resumed_from: Path | None = None
        self._pending_rng: dict | None = None
        self._pending_sampler: dict | None = None
        self._pending_plateau: list = []
        self._snapshot: dict | None = None
        self._nan_epochs: set = set()
        self._handled_errors: set = set()
        self._batch_index = {stage: None for stage in ERROR_STAGES}
        self._validated_epoch: int | None = None
        self._epoch_lr = math.nan
        self._started = False
        self._warned = set()

    # ------------------------------------------------------------------ public API

    def save_nan_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                            info: dict) -> Path | None:
        """Write ``epoch_{n}_nan.pth`` with the current (finite) weights and ``nan_info``.

        Call it before the optimizer step that would apply the NaN/Inf gradient. At most one
        file per epoch; it never becomes ``best_model.pth`` nor enters the rotation.

        Args:
            trainer: the running trainer.
            pl_module: the module being trained.
            info: what was detected (step, batch index, loss value, ...); stored as plain values.

        Returns:
            The file written, or None (not fitting, already written this epoch, non-finite
            weights, or the write failed).
        """
        if not self._writing(trainer):
            return None
        epoch = trainer.current_epoch
        if epoch in self._nan_epochs:
            return None
        bad = non_finite_weights(_bare_model(pl_module))
        if bad:
            log.warning("Not writing %s: the weights are already non-finite (%s); the newest "
                        "epoch checkpoint holds the last finite ones.", nan_file(epoch),
                        ", ".join(bad[:5]))
            return None
        self._nan_epochs.add(epoch)
        payload = self._payload(trainer, pl_module, epoch, extra={"nan_info": plain(info)})
        path = self.save_dir / nan_file(epoch)
        return path if self._write(path, payload, "the NaN state is not kept") else None

    def save_error_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                              error: BaseException, stage: str) -> Path | None:
        """Write ``epoch_{n}_error.pth`` (stage ``train``) or ``epoch_{n}_val_error.pth`` (``val``).

        The file holds the full state plus ``error_info``: type, message, traceback, stage,
        epoch, global step, batch index and rank. The caller decides whether the error goes on.
        Any rank writes it (under DDP, the one that failed), unless this run's file for the
        same step is already there: the others fail afterwards, when their collectives lose it.

        Returns:
            The file written, or None (not fitting, already written for this step by another
            rank, the state could not be dumped, or the write failed).

        Raises:
            ValueError: ``stage`` is not ``train`` or ``val``.
        """
        if stage not in ERROR_STAGES:
            raise ValueError(f"stage must be one of {ERROR_STAGES}, got {stage!r}.")
        if not self._started:
            return None
        self._handled_errors.add(id(error))
        epoch = trainer.current_epoch
        name = error_file(epoch) if stage == "train" else val_error_file(epoch)
        path = self.save_dir / name
        if trainer.world_size > 1 and self._error_already_saved(path, trainer.global_step):
            log.error("Rank %d: %s (%s); %s already holds the state of this step, written by "
                      "the rank that failed first.", trainer.global_rank,
                      type(error).__name__, _first_line(error), path)
            return None
        info = {
            "type": type(error).__qualname__,
            "module": type(error).__module__,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(type(error), error,
                                                            error.__traceback__)),
            "stage": stage,
            "epoch": epoch,
            "global_step": trainer.global_step,
            "batch_index": self._batch_index[stage],
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
        }
        try:
            payload = self._payload(trainer, pl_module, epoch, extra={"error_info": info})
        except Exception as dump_error:  # noqa: BLE001 - the state itself may be broken
            log.warning("Could not collect the training state for the %s error checkpoint: %r",
                        stage, dump_error)
            return None
        return path if self._write(path, payload, "the error state is not kept") else None

    def save_preempt_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                info: dict, at_epoch_end: bool = False) -> Path | None:
        """Write ``epoch_{n}_preempt.pth``: the state at a step boundary after a preemption signal.

        Inside an epoch the file holds the training sampler's position, so a resume continues
        with the next batch; ``at_epoch_end`` writes the epoch-end state instead (for when the
        epoch's own file could not be written). Older preemption files of this run are deleted
        once the new one is on disk. Every rank must call it at the same point (the ranks'
        random states are gathered); rank 0 writes.

        Args:
            trainer: the running trainer.
            pl_module: the module being trained.
            info: ``preempt_info`` (signal, epoch, global step, batch index), as plain values.
            at_epoch_end: the epoch's batches, validation and epoch-end hooks are done.

        Returns:
            The file written, or None (not fitting, not rank 0, or the write failed).
        """
        if not self._started:
            return None
        epoch = trainer.current_epoch
        rng_ranks = gather_rng_states(trainer)
        if not self._writing(trainer):
            return None
        state = self._state(plateau=_plateau_steps_due(trainer) if at_epoch_end else None,
                            sampler=None if at_epoch_end else sampler_position(trainer),
                            rng_ranks=rng_ranks)
        payload = self._payload(trainer, pl_module, epoch, snapshot=state,
                                extra={"preempt_info": plain(info)})
        path = self.save_dir / preempt_file(epoch)
        if not self._write(path, payload, "a resume starts from the newest epoch file"):
            return None
        self._remove_superseded_preempt_files(newer_than=path)
        return path

    def newest_epoch_checkpoint(self) -> Path | None:
        """The newest ``epoch_{n}.pth`` this run wrote (or resumed from) that is on disk and
        loads; None when there is none."""
        for name in sorted(self._rotation, key=lambda name: classify(name)[1], reverse=True):
            path = self.save_dir / name
            if not path.is_file():
                continue
            try:
                load_checkpoint(path)
            except ValueError as error:
                log.warning("Skipping %s: %s", path, error)
                continue
            return path
        return None

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = False
        if trainer.fast_dev_run:
            return
        self.save_dir = self.save_dir.absolute()
        if trainer.is_global_zero:
            remove_temporary_files(self.save_dir)
        # Every rank stamps its files (error files included) with rank 0's run id.
        self.run_id = trainer.strategy.broadcast(self.run_id or uuid.uuid4().hex, src=0)
        self._resumed_from = Path(trainer.ckpt_path).absolute() if trainer.ckpt_path else None
        self._adopt_folder()
        refusal = (self._foreign_files_refusal(trainer.max_epochs) if trainer.is_global_zero
                   else None)
        refusal = trainer.strategy.broadcast(refusal, src=0)
        if refusal:
            raise ForeignCheckpointError(refusal)
        if self._restored is not None:
            self._pending_rng = rng_state_for_rank(self._restored, trainer.global_rank,
                                                   trainer.world_size)
        self._started = True
        self._log_start()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is not None:
            restore_sampler_position(trainer, self._pending_sampler)
        self._pending_sampler = None
        # The restored scheduler state predates the plateau step Lightning takes after the
        # epoch-end hook; take it now, with the metric value the file recorded.
        for index, value in self._pending_plateau:
            if index < len(trainer.lr_scheduler_configs) and pl_module.automatic_optimization:
                config = trainer.lr_scheduler_configs[index]
                if config.reduce_on_plateau:
                    pl_module.lr_scheduler_step(config.scheduler, value)
        self._pending_plateau = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_lr = _current_lr(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # A run resumed inside an epoch enters it without on_train_epoch_start.
        if math.isnan(self._epoch_lr):
            self._epoch_lr = _current_lr(trainer)
        self._batch_index["train"] = batch_idx
        if self._pending_rng is not None:
            # Between an epoch's end and the next batch, a resumed run draws other numbers
            # (data loader seeds, the sanity check) than an uninterrupted one: realign here.
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._batch_index["val"] = batch_idx

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        metrics = trainer.callback_metrics
        validated = self._validated_epoch == epoch
        self._record_epoch(epoch, metrics, validated)
        self._pending_rng = capture_rng_state()
        rng_ranks = gather_rng_states(trainer)
        written = (self._write_epoch_files(trainer, pl_module, epoch, metrics, validated,
                                           rng_ranks)
                   if self._writing(trainer) else False)
        written = self._share_bookkeeping(trainer, written)
        preemption = find_preemption_handler(trainer)
        if self._started and preemption is not None and preemption.stop_after_epoch:
            path = None
            if not written:
                path = self.save_preempt_checkpoint(trainer, pl_module,
                                                    preemption.epoch_end_info(trainer),
                                                    at_epoch_end=True)
            preemption.stop(trainer, preemption.stop_after_epoch, path)

    def _write_epoch_files(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                           metrics: dict, validated: bool, rng_ranks: list | None) -> bool:
        """``best_model.pth`` and ``epoch_{n}.pth`` as configured; True when the epoch file was
        written."""
        # TODO(sharded strategies): FSDP and DeepSpeed gather state in dump_checkpoint on every
        # rank; this callback only supports strategies whose rank 0 holds the whole state.
        score = self._monitor_score(metrics, validated)
        improved = self._improves(score)
        write_best = improved or not self.save_best_only
        epoch_name = epoch_file(epoch) if self.save_every_epoch else None
        if not (epoch_name or write_best):
            return False
        plateau = _plateau_steps_due(trainer)
        best = (score, epoch) if write_best else None
        payload = self._payload(trainer, pl_module, epoch,
                                snapshot=self._state(epoch_name, best, plateau,
                                                     rng_ranks=rng_ranks))
        if write_best:
            self._save_best(payload, score, epoch, improved)
            # The epoch file records what really is in best_model.pth.
            payload["callbacks"][self.state_key] = self._state(epoch_name, None, plateau,
                                                               rng_ranks=rng_ranks)
            payload["best"] = self._best_summary()
        return bool(epoch_name) and self._save_epoch(payload, epoch_name)

    def _share_bookkeeping(self, trainer: L.Trainer, written: bool) -> bool:
        """Give every rank rank 0's record of the files (so that an error file written by any
        rank holds the same state); returns rank 0's ``written``."""
        if trainer.world_size <= 1:
            return written
        shared = trainer.strategy.broadcast({
            "written": written, "rotation": self._rotation, "ours": sorted(self._ours),
            "best_score": self._best_score, "best_epoch": self._best_epoch,
            "best_model_path": self.best_model_path,
        }, src=0)
        self._rotation, self._ours = list(shared["rotation"]), set(shared["ours"])
        self._best_score, self._best_epoch = shared["best_score"], shared["best_epoch"]
        self.best_model_path = shared["best_model_path"]
        return shared["written"]

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if not self._started or id(exception) in self._handled_errors:
            return
        if isinstance(exception, SIGTERMException):
            # A preemption (its file is written) or Lightning's own SIGTERM stop: not an error.
            log.info("Fit stopped by a termination signal; resume with --ckpt_path last.")
            return
        stage = "val" if trainer.validating or trainer.sanity_checking else "train"
        try:
            path = self.save_error_checkpoint(trainer, pl_module, exception, stage)
        except Exception:  # never replace the original exception with ours
            log.exception("Writing the error checkpoint failed")
            return
        if path is not None:
            log.error("%s raised %s; the state is saved in %s", stage, type(exception).__name__,
                      path)

    def state_dict(self) -> dict:
        return self._snapshot if self._snapshot is not None else self._state()

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("version") != STATE_VERSION:
            log.warning("Ignoring checkpoint-manager state of version %r (this code reads %d): "
                        "histories, best score and rotation start afresh.",
                        state_dict.get("version"), STATE_VERSION)
            return
        self._restored = state_dict
        self.run_id = state_dict["run_id"]
        self._last_epoch = state_dict["epoch"]
        self._best_val_acc = state_dict["best_val_acc"]
        self._latest.update(state_dict["latest"])
        self.history.load_state_dict(state_dict["history"])
        self._pending_rng = state_dict["rng"]  # on_fit_start picks this rank's, when held
        self._pending_sampler = state_dict.get("sampler")
        self._pending_plateau = [tuple(step) for step in state_dict["plateau"]]
        if self._started:  # strategies that restore after on_fit_start
            self._adopt_folder()

    # ------------------------------------------------------------------ bookkeeping

    def _writing(self, trainer: L.Trainer) -> bool:
        return self._started and trainer.is_global_zero

    def _record_epoch(self, epoch: int, metrics: dict, validated: bool) -> None:
        self.history.record(epoch, metrics, self._epoch_lr, validated)
        self._last_epoch = epoch
        for key, name in USER_METRICS.items():
            fresh = validated or name not in VALIDATION_METRICS
            self._latest[key] = metric_value(metrics, name) if fresh else math.nan
        accuracy = self._latest["val_accuracy"]
        if math.isfinite(accuracy) and not accuracy <= self._best_val_acc:
            self._best_val_acc = accuracy

    def _monitor_score(self, metrics: dict, validated: bool) -> float:
        if self.monitor not in metrics:
            if validated and "monitor" not in self._warned:
                self._warned.add("monitor")
                rank_zero_warn(f"training.monitor={self.monitor!r} is not logged, so "
                               f"{BEST_FILE} is never written; logged metrics: "
                               f"{sorted(metrics)}.")
            return math.nan
        stale = self.monitor.startswith("val_") and not validated
        return math.nan if stale else metric_value(metrics, self.monitor)

    def _improves(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        if self._best_score is None or not math.isfinite(self._best_score):
            return True
        return score > self._best_score if self.mode == "max" else score < self._best_score

    def _state(self, epoch_name: str | None = None, best: tuple | None = None,
               plateau: list | None = None, sampler: dict | None = None,
               rng_ranks: list | None = None) -> dict:
        """Plain-valued state; ``epoch_name`` and ``best`` describe a file about to be written,
        ``sampler`` the position inside the running epoch, ``rng_ranks`` every rank's random
        state (``rng`` is this rank's)."""
        rotation = list(self._rotation)
        if epoch_name and epoch_name not in rotation:
            rotation.append(epoch_name)
            pruned = {path.name for path in self._prunable(rotation)}
            rotation = [name for name in rotation if name not in pruned]
        score, best_epoch = best if best is not None else (self._best_score, self._best_epoch)
        return {
            "version": STATE_VERSION,
            "run_id": self.run_id,
            "save_dir": str(self.save_dir),
            "epoch": self._last_epoch,
            "monitor": self.monitor,
            "mode": self.mode,
            "best_score": score,
            "best_epoch": best_epoch,
            "best_val_acc": self._best_val_acc,
            "latest": dict(self._latest),
            "rotation": rotation,
            "history": self.history.state_dict(),
            "rng": capture_rng_state(),
            "rng_ranks": rng_ranks,
            "sampler": sampler,
            "plateau": [list(step) for step in plateau or []],
        }

    def _best_summary(self) -> dict:
        return {"monitor": self.monitor, "mode": self.mode, "score": self._best_score,
                "epoch": self._best_epoch}

    def _payload(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int,
                 snapshot: dict | None = None, extra: dict | None = None) -> dict:
        """Lightning's full checkpoint plus the user's top-level keys (aliases, not copies)."""
        self._snapshot = snapshot
        try:
            # Lightning's "model only" switch, off: optimizer, schedulers, loops and callback
            # state go in too. (Not torch.load's flag: every file still loads weights_only=True.)
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        finally:
            self._snapshot = None
        optimizer_states = checkpoint.get("optimizer_states") or [None]
        scheduler_states = checkpoint.get("lr_schedulers") or [None]
        state = checkpoint["callbacks"][self.state_key]
        checkpoint.update({
            "epoch": epoch,
            "run_id": self.run_id,
            "model_state_dict": _bare_model(pl_module).state_dict(),
            # TODO(several optimizers): the user's keys hold the first optimizer and scheduler;
            # all of them are under Lightning's optimizer_states and lr_schedulers.
            "optimizer_state_dict": optimizer_states[0],
            "scheduler_state_dict": scheduler_states[0],
            **state["latest"],
            "train_history": state["history"]["train"],
            "val_history": state["history"]["val"],
            "best_val_acc": state["best_val_acc"],
            "best": {"monitor": self.monitor, "mode": self.mode,
                     "score": state["best_score"], "epoch": state["best_epoch"]},
        })
        checkpoint.update(extra or {})
        self._warn_unloadable(checkpoint)
        return checkpoint

    def _warn_unloadable(self, checkpoint: dict) -> None:
        if "unloadable" in self._warned:
            return
        self._warned.add("unloadable")
        offenders = unloadable_values(checkpoint)
        if offenders:
            rank_zero_warn("These checkpoint values are not plain types, so torch.load("
                           "weights_only=True) and --ckpt_path will refuse the files: "
                           f"{offenders}. Pass plain values (str, numbers, lists) instead.")

    def _save_best(self, payload: dict, score: float, epoch: int, improved: bool) -> None:
        path = self.save_dir / BEST_FILE
        if not self._write(path, payload, f"{BEST_FILE} keeps the previous model"):
            return
        self._best_score, self._best_epoch = score, epoch
        self.best_model_path = str(path)
        if improved:
            log.info("Epoch %d: %s %.6g is the best so far -> %s", epoch, self.monitor, score,
                     path)

    def _save_epoch(self, payload: dict, name: str) -> bool:
        path = self.save_dir / name
        if not self._write(path, payload, "older epoch files are kept"):
            return False
        self._remove_superseded_preempt_files(newer_than=path)
        if name not in self._rotation:
            self._rotation.append(name)
        for stale in self._prunable(self._rotation):
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
            except OSError as error:
                log.warning("Could not delete the old checkpoint %s: %s", stale, error)
                continue
            self._rotation.remove(stale.name)
        return True

    def _remove_superseded_preempt_files(self, newer_than: Path) -> None:
        """Delete this run's preemption files older (by progress) than ``newer_than``, which is
        on disk: a resume would never choose them again."""
        limit = progress_key(newer_than)
        for path in sorted(self.save_dir.glob("epoch_*_preempt.pth")):
            key = progress_key(path)
            if path == newer_than or key is None or not key < limit or not self._is_ours(path):
                continue
            try:
                path.unlink()
            except OSError as error:
                log.warning("Could not delete the superseded preemption file %s: %s", path,
                            error)
                continue
            self._ours.discard(path.name)
            log.info("Deleted %s: %s is newer.", path.name, newer_than.name)

    def _error_already_saved(self, path: Path, global_step: int) -> bool:
        """Whether ``path`` is this run's error file of the step ``global_step``."""
        summary = read_summary(path) if path.is_file() else None
        if summary is None or summary.get("run_id") != self.run_id:
            return False
        return (summary.get("error_info") or {}).get("global_step") == global_step

    def _prunable(self, rotation: list) -> list:
        protected = [self._resumed_from] if self._resumed_from else []
        return files_to_prune([self.save_dir / name for name in rotation], self.keep_last,
                              protected)

    def _write(self, path: Path, payload: dict, consequence: str) -> bool:
        """``atomic_save`` that reports a failed write instead of raising; True when on disk."""
        if not self._may_overwrite(path):
            log.warning("Not writing %s: a file of another run is there. Move it away or use "
                        "another training.save_dir.", path)
            return False
        try:
            size = atomic_save(payload, path)
        except Exception as error:
            cause = _disk_error(error)
            if cause is None:
                raise
            log.warning("Could not save %s: %s (%s free in %s). Training goes on; %s.", path,
                        cause, _free_space(self.save_dir), self.save_dir, consequence)
            return False
        self._ours.add(path.name)
        log.debug("Saved %s (%d bytes)", path, size)
        return True

    def _may_overwrite(self, path: Path, move_damaged: bool = True) -> bool:
        """Whether ``path`` is free, ours, or unreadable (moved aside first when asked)."""
        if path.name in self._ours or not path.exists():
            return True
        summary = read_summary(path)
        if summary is None:
            return self._move_aside(path) if move_damaged else True
        if summary.get("run_id") == self.run_id:
            self._ours.add(path.name)
            return True
        return False

    def _move_aside(self, path: Path) -> bool:
        # Damaged, or of a format torch will not load safely: keep its bytes under a name
        # that is no checkpoint name, rather than writing over it.
        target = path.with_name(path.name + DAMAGED_SUFFIX)
        number = 1
        while target.exists():
            number += 1
            target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{number}")
        try:
            path.rename(target)
        except OSError as error:
            log.warning("Not writing %s: it does not load and could not be moved aside (%s).",
                        path, error)
            return False
        log.warning("%s does not load (damaged or of another format); moved it to %s.", path,
                    target.name)
        return True

    def _is_ours(self, path: Path) -> bool:
        summary = read_summary(path)
        return summary is not None and summary.get("run_id") == self.run_id

    # ------------------------------------------------------------------ fit start

    def _adopt_folder(self) -> None:
        """Keep, of the restored bookkeeping, what is really on disk in this folder and ours."""
        restored = self._restored or {}
        same_folder = restored.get("save_dir") == str(self.save_dir)
        self._rotation = [name for name in (restored.get("rotation", []) if same_folder else [])
                          if (self.save_dir / name).is_file()
                          and self._is_ours(self.save_dir / name)]
        resumed = self._resumed_from
        if (resumed is not None and resumed.parent == self.save_dir
                and classify(resumed)[0] == "epoch" and resumed.name not in self._rotation
                and self._is_ours(resumed)):
            self._rotation.append(resumed.name)
        self._ours.update(self._rotation)
        self._adopt_best_file()

    def _adopt_best_file(self) -> None:
        """Take the best score from ``best_model.pth`` when it is ours (it may be newer than the
        file resumed from); without one, the next epoch writes a fresh best."""
        self._best_score, self._best_epoch, self.best_model_path = None, None, ""
        path = self.save_dir / BEST_FILE
        summary = read_summary(path) if path.is_file() else None
        if summary is None or summary.get("run_id") != self.run_id:
            return
        self._ours.add(path.name)
        best = summary.get("best") or {}
        self.best_model_path = str(path)
        if best.get("monitor") == self.monitor and best.get("mode") == self.mode:
            self._best_score, self._best_epoch = best.get("score"), best.get("epoch")
        else:
            log.info("%s was chosen by %s (%s); this run monitors %s (%s): the next epoch "
                     "replaces it.", path, best.get("monitor"), best.get("mode"), self.monitor,
                     self.mode)

    def _foreign_files_refusal(self, max_epochs: int | None) -> str | None:
        """Why training must not start: files of another run sit under names this run will
        write (the message of a :class:`ForeignCheckpointError`); None when there are none."""
        if not self.save_dir.is_dir():
            return None
        first = self._last_epoch + 1
        last = max_epochs - 1 if max_epochs is not None and max_epochs >= 0 else math.inf
        at_risk = []
        for path in sorted(self.save_dir.iterdir()):
            kind, epoch = classify(path)
            in_range = kind in EPOCH_KINDS and first <= epoch <= last
            written_by_this_run = kind == "best" or in_range
            if written_by_this_run and not self._may_overwrite(path, move_damaged=False):
                at_risk.append(path.name)
        if not at_risk:
            return None
        return (f"training.save_dir {self.save_dir} holds checkpoint files of another run that "
                f"this run would overwrite: {', '.join(at_risk)}. Move them away (or back them "
                "up as backup_*.pth), choose another --training.save_dir, or continue that run "
                "with --ckpt_path last.")

    def _log_start(self) -> None:
        if self._restored is None:
            rank_zero_info(f"Checkpoints go to {self.save_dir} (run {self.run_id[:8]}).")
            return
        best = ("none yet" if self._best_score is None
                else f"{self.monitor} {self._best_score:.6g} at epoch {self._best_epoch}")
        position = self._pending_sampler
        where = (f"inside epoch {position['epoch']} after {position.get('batches')} batch(es)"
                 if position else f"after epoch {self._last_epoch}")
        rank_zero_info(f"Checkpoints go to {self.save_dir}: run {self.run_id[:8]} continues "
                       f"{where}; {len(self._rotation)} epoch file(s) kept, best {best}.")


def non_finite_weights(module: torch.nn.Module) -> list:
    """Names of the floating-point parameters and buffers of ``module`` holding NaN or Inf."""
    return [name for name, tensor in module.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def _bare_model(pl_module: L.LightningModule) -> torch.nn.Module:
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, torch.nn.Module) else pl_module


def _plateau_steps_due(trainer: L.Trainer) -> list:
    """``[index, value]`` of the plateau schedulers Lightning steps after the epoch-end hook."""
    due = []
    for index, config in enumerate(trainer.lr_scheduler_configs):
        if (config.reduce_on_plateau and config.interval == "epoch"
                and (trainer.current_epoch + 1) % config.frequency == 0
                and config.monitor in trainer.callback_metrics):
            due.append([index, metric_value(trainer.callback_metrics, config.monitor)])
    return due


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else ""


def _disk_error(error: BaseException) -> OSError | None:
    """The ``OSError`` behind a failed write; torch reports some as a RuntimeError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _free_space(folder: Path) -> str:
    try:
        free = float(free_disk_bytes(folder))
    except OSError:
        return "unknown space"
    for unit in ("B", "KB", "MB", "GB"):
        if free < 1024:
            return f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TB"


def _current_lr(trainer: L.Trainer) -> float:
    """Learning rate of the first optimizer's first group, NaN before optimizers exist."""
    optimizers = trainer.optimizers
    return float(optimizers[0].param_groups[0]["lr"]) if optimizers else math.nan
