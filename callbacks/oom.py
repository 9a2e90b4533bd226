"""Out of memory on CUDA or MPS, in training and validation: release, report, then a policy.

Lightning ends ``fit`` on any exception after the callbacks' ``on_exception``, and recognises
out-of-memory only from messages that mention CUDA. This callback recognises both device kinds
(see :func:`lit_models.batch_splitting.is_out_of_memory`) and applies ``oom_policy``:

* ``stop`` (default): in ``on_exception``, the failed step's frames (batch and activations) are
  cleared and the device cache emptied before the checkpoint manager, which Lightning runs
  after the other callbacks, writes its error checkpoint; the advice is printed and fit ends;
* ``split``: the module's steps run through a :class:`BatchSplitter`, which catches the error
  inside the step, releases the memory, and retries the failing batch in halves with the same
  accumulated gradient; each such event writes the error checkpoint (once per epoch and stage)
  and prints the advice. After 3 halvings the error is raised and fit ends as with ``stop``.
"""

import logging
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.alerts import raise_alert
from callbacks.manager_access import find_checkpoint_manager
from lit_models.batch_splitting import BatchSplitter, is_out_of_memory, release_memory

log = logging.getLogger(__name__)

OOM_POLICIES = ("stop", "split")
ERROR_STAGES = ("train", "val")  # the stages with an error checkpoint file
STAGE_NAMES = {"train": "training", "val": "validation", "test": "test", "predict": "predict"}
MAX_HALVINGS = 3
OOM_ADVICE = (
    "Advice: data.batch_size 4-8 (a cross-sectional batch holds whole days); "
    "data.num_center_nodes 6-8; trainer.accumulate_grad_batches instead of a larger batch; "
    "train on the CPU (--trainer.accelerator=cpu) if the GPU is too small; watch "
    "peak_memory_gb in the logs."
)


class OutOfMemoryGuard(Callback):
    """Recognises out-of-memory errors, frees memory, reports, and applies ``oom_policy``.

    Args:
        policy: ``stop`` or ``split`` (``training.oom_policy``).
        max_halvings: how deep ``split`` may halve a batch before it gives up.

    Raises:
        ValueError: an unknown policy, naming the key, the value and the choices.
    """

    def __init__(self, policy: str = "stop", max_halvings: int = MAX_HALVINGS):
        if policy not in OOM_POLICIES:
            raise ValueError(
                f"training.oom_policy must be one of {OOM_POLICIES}, got {policy!r}.")
        self.policy = policy
        self.max_halvings = max_halvings
        self.recovered = 0
        self._trainer: Optional[L.Trainer] = None
        self._reported: Optional[BaseException] = None
        self._seen: set = set()  # (epoch, stage) that had an out-of-memory event

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if self.policy != "split":
            return
        if not hasattr(pl_module, "enable_batch_splitting"):
            log.warning("oom_policy=split: %s cannot split batches; out-of-memory will stop.",
                        type(pl_module).__name__)
            return
        if trainer.world_size > 1:
            # TODO(split under DDP): the in-step backward bypasses DDP's gradient hooks; the
            # surrogate loss would need the reducer's cooperation across ranks.
            log.warning("oom_policy=split works on one device only; out-of-memory will stop.")
            return
        pl_module.enable_batch_splitting(
            BatchSplitter(self.max_halvings, self._on_split_out_of_memory))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "enable_batch_splitting"):
            pl_module.enable_batch_splitting(None)

    def _on_split_out_of_memory(self, error: BaseException, stage: str, halvings: int,
                                gave_up: bool) -> None:
        """Told by the splitter of each out-of-memory error, after memory was released."""
        trainer = self._trainer
        if trainer is None:
            return
        first_this_epoch = (trainer.current_epoch, stage) not in self._seen
        self._write_error_checkpoint(trainer, error, stage)
        if gave_up:
            action = (f"Cannot split the batch further ({halvings - 1} halvings): "
                      f"training stops.")
            self._reported = error
        else:
            action = (f"Retrying the batch in halves (halving {halvings} of "
                      f"{self.max_halvings}, oom_policy=split); later batches start as split.")
            self.recovered += 1
        # Every event is counted; the warning shows for the first of each epoch and stage.
        raise_alert(trainer, "out_of_memory", _message(trainer, error, stage, action),
                    warn=gave_up or first_this_epoch)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        if not is_out_of_memory(exception):
            return
        release_memory(exception, pl_module.device)
        if exception is self._reported:
            return
        stage = ("test" if trainer.testing else "predict" if trainer.predicting
                 else "val" if trainer.validating or trainer.sanity_checking else "train")
        raise_alert(trainer, "out_of_memory",
                    _message(trainer, exception, stage, "Training stops (oom_policy=stop)."))

    def _write_error_checkpoint(self, trainer: L.Trainer, error: BaseException,
                                stage: str) -> None:
        key = (trainer.current_epoch, stage)
        if key in self._seen:
            return
        self._seen.add(key)
        manager = find_checkpoint_manager(trainer)
        if manager is None or stage not in ERROR_STAGES or trainer.state.fn != "fit":
            return
        try:
            manager.save_error_checkpoint(trainer, trainer.lightning_module, error, stage)
        except Exception as save_error:  # the manager reports its own failures
            log.warning("Could not write the error checkpoint: %s", save_error)

    def state_dict(self) -> dict:
        return {"recovered": self.recovered}

    def load_state_dict(self, state_dict: dict) -> None:
        self.recovered = int(state_dict.get("recovered", 0))


def _message(trainer: L.Trainer, error: BaseException, stage: str, action: str) -> str:
    text = str(error).strip()
    first_line = text.splitlines()[0].rstrip(".") if text else "no message"
    where = STAGE_NAMES.get(stage, stage)
    return (f"⚠ Warning: Out of memory in {where} (epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}): {type(error).__name__}: {first_line[:200]}. The failed "
            f"step's tensors were released and the device cache emptied. {action} {OOM_ADVICE}")
