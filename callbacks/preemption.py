"""Preemption: SIGTERM or SIGUSR1 stops training at the next step boundary, with a checkpoint.

Clusters announce the end of a job with a signal some time before they kill it: SIGTERM
(Kubernetes, most schedulers, ``kill``), SIGUSR1 (SLURM with ``--signal=USR1@90``). The signal
handler only records which signal came; :class:`PreemptionHandler` acts on it at the next safe
point of the training loop, never inside the handler:

* after a training batch that completes an optimizer step (not inside gradient accumulation)
  and is not the last of its epoch, the checkpoint manager writes ``epoch_{n}_preempt.pth``
  with the sampler's position, so that a resume continues with the next batch;
* after the last batch of an epoch, validation and the epoch's own files come first; the run
  stops once ``epoch_{n}.pth`` is written (``epoch_{n}_preempt.pth`` holds the epoch-end state
  when that file could not be written). A signal during validation waits for its end.

Then every rank raises :class:`Preempted` and the process exits with
:data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL`` of ``sysexits.h``: "try again later"), so that
a supervisor (a Kubernetes Job, torchrun ``--max-restarts``, a shell loop) restarts it; the next
``python train.py fit ... --ckpt_path last`` picks the preemption file up.

Lightning's own SIGTERM handling stops the loop at points of its own (between validation
batches too) and saves nothing; its SLURM SIGUSR1 handler saves an ``hpc_ckpt`` inside the signal
handler. From the sanity check on, this handler takes both signals over for the rest of the fit
(Lightning puts the previous handlers back when fit ends), carries over a SIGTERM Lightning
caught before, raises Lightning's own ``SIGTERMException`` type (so callbacks written for
Lightning's stop see ours too) and, under SLURM with auto-requeue, requeues the job itself once
the file is written when the signal was SLURM's requeue signal (SIGUSR1 unless configured
otherwise; a SIGTERM may be ``scancel``, so it never requeues, as in Lightning).

Several processes: a signal may reach one rank only. The ranks agree at every check point (an
all-reduce of the signal number), so all stop after the same step; rank 0 writes the file and
the ranks meet at a barrier before they raise. The helper processes that Lightning starts itself
for ``--trainer.devices=N`` (local rank > 0, without torchrun or SLURM) exit with 0 instead of 75:
Lightning's launcher SIGKILLs every process as soon as one of them exits with another code, and
rank 0 may still be tidying up. The command's own exit code is rank 0's.
"""

import logging
import os
import signal
import subprocess
import threading

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.manager_access import find_checkpoint_manager

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1")
                           if hasattr(signal, name))


class Preempted(SIGTERMException):
    """Training stopped for a preemption signal after saving its state; exit code 75 (or 0 for
    the helper processes of Lightning's own launcher, see the module docstring).

    Attributes:
        signal_name: ``SIGTERM``, ``SIGUSR1``, ...
        path: the preemption file written, or None (the epoch file holds the state, or the write
            failed; see the log).
    """

    def __init__(self, signal_name: str, path=None, exit_code: int = PREEMPTED_EXIT_CODE):
        super().__init__(exit_code)
        self.signal_name = signal_name
        self.path = path

    def __str__(self) -> str:
        where = f"state in {self.path}" if self.path else "state in the newest epoch file"
        return f"preempted by {self.signal_name}; {where}; resume with --ckpt_path last"


class PreemptionHandler(Callback):
    """Turns SIGTERM/SIGUSR1 into a checkpoint at the next step boundary and a clean exit.

    Args:
        signals: the signals that mean "preempted" (default SIGTERM and SIGUSR1; under SLURM
            also its requeue signal).
    """

    def __init__(self, signals: tuple = PREEMPTION_SIGNALS):
        self.signals = tuple(signals)
        self.received: int = 0  # the signal number once one came; set by the handler only
        self.stop_after_epoch: int = 0  # agreed signal to act on once the epoch's files exist
        self._replaced: dict = {}

    # -- the signal handler ----------------------------------------------------------------

    def _on_signal(self, signum: int, frame) -> None:
        # Only a flag: saving here could interrupt a half-written checkpoint or a collective.
        self.received = self.received or signum

    def _install(self, trainer: L.Trainer) -> None:
        if self._replaced or threading.current_thread() is not threading.main_thread():
            return
        for signum in self._signals_for(trainer):
            self._replaced[signum] = signal.signal(signum, self._on_signal)
        if getattr(trainer, "received_sigterm", False):
            self.received = self.received or signal.SIGTERM

    def _signals_for(self, trainer: L.Trainer) -> list:
        signums = list(self.signals)
        environment = _cluster_environment(trainer)
        requeue = getattr(environment, "requeue_signal", None)
        if isinstance(environment, SLURMEnvironment) and requeue and requeue not in signums:
            signums.append(requeue)
        return signums

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.received, self.stop_after_epoch = 0, 0

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its handlers just before the sanity check: take over after it.
        self._install(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install(trainer)  # a resumed run skips the sanity check

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores the handlers it found when fit started; put back ours only where
        # that did not happen.
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._replaced.items():
                if signal.getsignal(signum) == self._on_signal and previous is not None:
                    signal.signal(signum, previous)
        self._replaced = {}

    # -- the check points --------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs,
                           batch, batch_idx: int) -> None:
        if not _inside_epoch_step_boundary(trainer, batch_idx):
            return
        signum = self.agreed_signal(trainer)
        if not signum:
            return
        manager = find_checkpoint_manager(trainer)
        info = self._info(trainer, signum, batch_idx, at_epoch_end=False)
        path = None
        if manager is not None and hasattr(manager, "save_preempt_checkpoint"):
            path = manager.save_preempt_checkpoint(trainer, pl_module, info)
        self.stop(trainer, signum, path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the checkpoint manager writes the epoch's files; it stops after them. The
        # last epoch just finishes: the run is complete.
        if _training_ends(trainer, epoch_end=True):
            self.stop_after_epoch = 0
            return
        self.stop_after_epoch = self.agreed_signal(trainer)
        if self.stop_after_epoch and find_checkpoint_manager(trainer) is None:
            self.stop(trainer, self.stop_after_epoch, None)

    def epoch_end_info(self, trainer: L.Trainer) -> dict:
        """``preempt_info`` of a preemption file written at the end of the epoch."""
        return self._info(trainer, self.stop_after_epoch, None, at_epoch_end=True)

    def agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal any rank received (the highest number), 0 when none did.

        A collective under several processes: every rank must call it at the same point.
        """
        local = int(self.received)
        if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([local], dtype=torch.int64, device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def stop(self, trainer: L.Trainer, signum: int, path) -> None:
        """Meet the other ranks, requeue a SLURM job, and raise :class:`Preempted`."""
        name = _signal_name(signum)
        trainer.strategy.barrier("preempted")  # nobody exits while rank 0 still writes
        if trainer.is_global_zero:
            _requeue_slurm_job(trainer, signum)
        rank_zero_info(f"Preempted by {name} at epoch {trainer.current_epoch}, step "
                       f"{trainer.global_step}: "
                       + (f"saved {path}" if path else "the newest epoch file holds the state")
                       + f"; exit code {PREEMPTED_EXIT_CODE}. Resume with --ckpt_path last.")
        raise Preempted(name, path, _exit_code(trainer))

    @staticmethod
    def _info(trainer: L.Trainer, signum: int, batch_idx, at_epoch_end: bool) -> dict:
        return {
            "signal": _signal_name(signum),
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "batch_index": batch_idx,
            "at_epoch_end": at_epoch_end,
            "world_size": trainer.world_size,
        }


def find_preemption_handler(trainer: L.Trainer) -> PreemptionHandler | None:
    """The Trainer's :class:`PreemptionHandler`, or None."""
    for callback in trainer.callbacks:
        if isinstance(callback, PreemptionHandler):
            return callback
    return None


def _inside_epoch_step_boundary(trainer: L.Trainer, batch_idx: int) -> bool:
    """After an optimizer step and before the epoch's last batch (the same on every rank)."""
    if (batch_idx + 1) % max(trainer.accumulate_grad_batches, 1) != 0:
        return False
    return batch_idx + 1 < trainer.num_training_batches and not _training_ends(trainer)


def _training_ends(trainer: L.Trainer, epoch_end: bool = False) -> bool:
    """Whether fit ends here anyway: the step or epoch limit is reached, or it was told to stop."""
    if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and \
        trainer.current_epoch + 1 >= trainer.max_epochs
    return epoch_end and (last_epoch or trainer.should_stop)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _cluster_environment(trainer: L.Trainer):
    return getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment",
                   None)


def _exit_code(trainer: L.Trainer) -> int:
    environment = _cluster_environment(trainer)
    launched_by_lightning = (
        trainer.local_rank > 0 and environment is not None
        and not environment.creates_processes_externally)
    return 0 if launched_by_lightning else PREEMPTED_EXIT_CODE


def _requeue_slurm_job(trainer: L.Trainer, signum: int) -> None:
    """``scontrol requeue`` the job, as Lightning's SLURM handler would, once the file is safe."""
    environment = _cluster_environment(trainer)
    if not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue \
            or signum != environment.requeue_signal:
        return
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array_job
           else os.environ.get("SLURM_JOB_ID"))
    if not job:
        return
    try:
        result = subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("Could not requeue SLURM job %s: %s. Resubmit it with --ckpt_path last.",
                    job, error)
        return
    if result.returncode == 0:
        log.info("Requeued SLURM job %s.", job)
    else:
        log.warning("scontrol requeue %s failed with code %d. Resubmit it with --ckpt_path "
                    "last.", job, result.returncode)
