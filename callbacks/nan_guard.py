"""NaN/Inf in the training loss or gradients: caught before the optimizer step, then handled.

Lightning's loop has no such check. The guard reads the loss in ``on_before_backward`` and the
gradients in ``on_before_optimizer_step`` (after backward, before clipping and before the
step). On a non-finite value it

1. warns ``⚠ Warning: NaN/Inf detected in training loss`` with the epoch, step and batch index
   and names the non-finite input features of the batch as (day, node, feature);
2. asks the checkpoint manager for ``epoch_{n}_nan.pth``, while the weights are still finite;
3. applies ``nan_policy``:

   * ``skip``: drops every gradient, so the optimizer leaves the weights (and its own state)
     untouched for this step;
   * ``rollback``: loads the model and optimizer state of the newest epoch checkpoint, halves
     the learning rate, and drops the step's gradients;
   * ``stop``: drops the step's gradients and asks the Trainer to stop.

After ``max_consecutive_nan`` such steps in a row the Trainer is asked to stop, with a list of
what to check. Under 16-bit mixed precision an overflow of the gradients alone (finite loss) is
left to the GradScaler, which skips that step and lowers its scale by design.

Several processes (DDP): the ranks agree before acting (an all-reduce of every rank's two
flags at each optimizer step), so a NaN loss on one rank makes every rank skip, roll back or
stop at the same step and their weights stay equal; ``nan_info['ranks']`` names the ranks that
saw it. A rollback loads the state rank 0 read, sent to every rank.
"""

import logging
import math
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from callbacks.alerts import raise_alert
from callbacks.gradient_monitor import gradient_norm
from callbacks.manager_access import find_checkpoint_manager

log = logging.getLogger(__name__)

NAN_POLICIES = ("skip", "rollback", "stop")
NAN_WARNING = "⚠ Warning: NaN/Inf detected in training loss"
NAN_ADVICE = (
    "Likely causes: a learning rate too high, exploding gradients, numerical instability, "
    "bad input values. Advice: the default learning rate is 5e-5; keep gradient clipping "
    "(gradient_clip_val 1.0, max_grad_norm); check the inputs for outliers."
)
STOP_CHECKLIST = (
    "Check: (1) model.learning_rate (5e-5 is the default; halve it); (2) "
    "trainer.gradient_clip_val (1.0); (3) the input data for NaN/Inf and extreme values, "
    "in the features named in the warnings above; (4) the labels; (5) the newest "
    "epoch_{n}_nan.pth for the weights and batch of the first bad step."
)
LISTED_INPUTS = 10
LR_FACTOR = 0.5


class NanGuard(Callback):
    """Detects a non-finite loss or gradient before the optimizer step and applies a policy.

    Args:
        policy: ``skip``, ``rollback`` or ``stop`` (``training.nan_policy``).
        max_consecutive: bad steps in a row after which training stops
            (``training.max_consecutive_nan``).

    Raises:
        ValueError: an unknown policy or a non-positive ``max_consecutive``, naming the key.
    """

    def __init__(self, policy: str = "skip", max_consecutive: int = 10):
        if policy not in NAN_POLICIES:
            raise ValueError(
                f"training.nan_policy must be one of {NAN_POLICIES}, got {policy!r}.")
        if not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(
                f"training.max_consecutive_nan must be an integer >= 1, got {max_consecutive!r}.")
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.rollbacks = 0
        # The batches of the optimizer step being prepared (several under gradient accumulation):
        # only their input tensors are held, and only until the step.
        self._window: list = []
        self._loss_finite: Optional[torch.Tensor] = None

    # -- what the step saw ---------------------------------------------------------------

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window = []
        self._loss_finite = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._window.append((batch_idx, batch))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._window = []  # let an out-of-memory handler free these batches too

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           loss: torch.Tensor) -> None:
        # Kept as a tensor: the device syncs once per optimizer step, in the check below.
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    # -- the check -----------------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        loss_finite = True if self._loss_finite is None else bool(self._loss_finite)
        window, self._window, self._loss_finite = self._window, [], None
        norm = gradient_norm(optimizer, trainer)
        grads_finite = norm is None or math.isfinite(norm)
        loss_finite, grads_finite, ranks = agree_on_finite(trainer, loss_finite, grads_finite)
        if loss_finite and grads_finite:
            self.consecutive = 0
            return
        if loss_finite and _has_grad_scaler(trainer):
            log.debug("gradient overflow at step %d left to the GradScaler", trainer.global_step)
            return
        self._handle(trainer, pl_module, optimizer, loss_finite, window, ranks)

    def _handle(self, trainer: L.Trainer, pl_module: L.LightningModule,
                optimizer: torch.optim.Optimizer, loss_finite: bool, window: list,
                ranks: list) -> None:
        self.total += 1
        self.consecutive += 1
        indices = [index for index, _ in window]
        batches = (f"batch {indices[0]}" if len(indices) == 1 else
                   f"batches {indices[0]}-{indices[-1]}" if indices else "batch ?")
        where = f"epoch {trainer.current_epoch}, step {trainer.global_step}, {batches}"
        if trainer.world_size > 1:
            where += f", rank(s) {', '.join(map(str, ranks))} of {trainer.world_size}"
        bad_inputs, more = non_finite_inputs([sample for _, batch in window
                                              for sample in _samples(batch)],
                                             *_input_names(trainer))
        manager = find_checkpoint_manager(trainer)
        info = {
            "warning": NAN_WARNING,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "batch_idx": indices[-1] if indices else -1,
            "batch_indices": indices,
            "non_finite": "gradients" if loss_finite else "loss",
            "non_finite_inputs": [", ".join(entry) for entry in bad_inputs],
            "policy": self.policy,
            "ranks": ranks,
        }
        saved = _save_nan_checkpoint(manager, trainer, pl_module, info)

        action = self._apply_policy(trainer, pl_module, optimizer, manager)
        message = (f"{NAN_WARNING} ({where}; non-finite "
                   f"{'gradients' if loss_finite else 'loss'}). "
                   f"{_describe_inputs(bad_inputs, more)} {action}"
                   f"{f' Saved {saved}.' if saved else ''} {NAN_ADVICE}")
        raise_alert(trainer, "nan_inf", message)

        if self.policy != "stop" and self.consecutive >= self.max_consecutive:
            trainer.should_stop = True
            raise_alert(trainer, "nan_stop",
                        f"Training stops: {self.consecutive} optimizer steps in a row had a "
                        f"NaN/Inf loss or gradient (training.max_consecutive_nan = "
                        f"{self.max_consecutive}). {STOP_CHECKLIST}")

    def _apply_policy(self, trainer: L.Trainer, pl_module: L.LightningModule,
                      optimizer: torch.optim.Optimizer, manager) -> str:
        """Carry out the policy for this step; returns a sentence saying what was done."""
        drop_gradients(optimizer)
        if self.policy == "skip":
            return "Skipped the optimizer step (nan_policy=skip): the weights are unchanged."
        if self.policy == "stop":
            trainer.should_stop = True
            return "Training stops after this batch (nan_policy=stop)."
        return self._rollback(trainer, pl_module, optimizer, manager)

    def _rollback(self, trainer: L.Trainer, pl_module: L.LightningModule,
                  optimizer: torch.optim.Optimizer, manager) -> str:
        lrs_before = [group["lr"] for group in optimizer.param_groups]
        path, state, problem = None, None, None
        if trainer.is_global_zero and manager is not None:
            path = manager.newest_epoch_checkpoint()
            if path is not None:
                try:
                    state = read_training_state(Path(path))
                except Exception as error:  # a bad file must not end the run: skip instead
                    problem = f"{type(error).__name__}: {error}"
        # Every rank rolls back to the same state, or none does (no shared disk needed).
        path, state, problem = trainer.strategy.broadcast((path, state, problem), src=0)
        restored = ""
        if path is None:
            restored = "No epoch checkpoint to roll back to yet: skipped the step instead. "
        elif problem is None:
            try:
                apply_training_state(state, pl_module, optimizer)
                self.rollbacks += 1
                restored = f"Rolled back to {path} (model and optimizer state). "
            except Exception as error:  # noqa: BLE001 - a state that does not fit: skip instead
                problem = f"{type(error).__name__}: {error}"
        if problem is not None:
            restored = f"Could not roll back to {path} ({problem}): skipped the step instead. "
        halved = scale_learning_rates(trainer, optimizer, lrs_before, LR_FACTOR)
        lrs = ", ".join(f"{lr:.3g}" for lr in halved)
        return f"{restored}Learning rate halved to {lrs} (nan_policy=rollback)."

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total,
                "rollbacks": self.rollbacks}

    def load_state_dict(self, state_dict: dict) -> None:
        self.consecutive = int(state_dict.get("consecutive", 0))
        self.total = int(state_dict.get("total", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Set every gradient to None: torch optimizers then leave those parameters untouched."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = None


def read_training_state(path: Path) -> dict:
    """``model_state_dict`` and ``optimizer_state_dict`` of an epoch checkpoint, checked.

    Raises:
        ValueError: the file lacks a key, or its model state holds a non-finite value.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model_state_dict", "optimizer_state_dict"):
        if key not in state:
            raise ValueError(f"{path} has no {key!r}")
    model_state = state["model_state_dict"]
    for name, value in model_state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
            raise ValueError(f"{path} holds non-finite values in {name!r}")
    return {key: state[key] for key in ("model_state_dict", "optimizer_state_dict")}


def apply_training_state(state: dict, pl_module: L.LightningModule,
                         optimizer: torch.optim.Optimizer) -> None:
    """Load :func:`read_training_state`'s output into the bare model and the optimizer."""
    getattr(pl_module, "model", pl_module).load_state_dict(state["model_state_dict"])
    optimizer.load_state_dict(state["optimizer_state_dict"])


def agree_on_finite(trainer: L.Trainer, loss_finite: bool, grads_finite: bool) -> tuple:
    """``(loss_finite, grads_finite, ranks)`` agreed by every rank: a flag is False when it is
    on any rank; ``ranks`` lists the ranks whose loss was non-finite or, with finite losses
    everywhere, whose gradients were (DDP averages the gradients, so a NaN spreads to all).

    A collective under several processes: every rank calls it at every optimizer step.
    """
    bad = [not loss_finite, not grads_finite]
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return loss_finite, grads_finite, [trainer.global_rank] if any(bad) else []
    flags = torch.zeros((trainer.world_size, 2), dtype=torch.int32,
                        device=trainer.strategy.root_device)  # (ranks, [loss, gradients])
    flags[trainer.global_rank] = torch.tensor(bad, dtype=torch.int32)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    flags = flags.cpu().bool()
    column = 0 if bool(flags[:, 0].any()) else 1
    ranks = [rank for rank in range(trainer.world_size) if bool(flags[rank, column])]
    return not bool(flags[:, 0].any()), not bool(flags[:, 1].any()), ranks


def scale_learning_rates(trainer: L.Trainer, optimizer: torch.optim.Optimizer,
                         lrs_before: list, factor: float) -> list:
    """Set group ``i``'s learning rate to ``lrs_before[i] * factor``; scale the schedulers'
    base rates by ``factor`` too, so that a later schedule restart keeps the reduction.

    Returns:
        The new learning rate of each parameter group.
    """
    new_lrs = [lr * factor for lr in lrs_before]
    for group, lr in zip(optimizer.param_groups, new_lrs, strict=True):
        group["lr"] = lr
    for config in getattr(trainer, "lr_scheduler_configs", []):
        scheduler = config.scheduler
        if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    return new_lrs


def non_finite_inputs(batch, dates=None, nodes=None, features=None,
                      limit: int = LISTED_INPUTS) -> tuple[list, int]:
    """The (day, node, feature) of every non-finite input feature window of ``batch``.

    Accepts a cross-sectional batch (a list of day samples), one day sample, or a pooled dict
    of stacked tensors. A (node, feature) pair is listed once, whatever the number of bad bars
    in its window.

    Returns:
        Up to ``limit`` (day, node, feature) string triples, and the count of the rest.
    """
    samples = _samples(batch)
    found = []
    total = 0
    for sample in samples:
        if not isinstance(sample, dict) or not torch.is_tensor(sample.get("x")):
            continue
        x = sample["x"]  # (rows, window, features)
        bad = ~torch.isfinite(x).reshape(x.shape[0], -1, x.shape[-1]).all(dim=1)  # (rows, feat)
        rows, columns = torch.nonzero(bad, as_tuple=True)
        total += len(rows)
        day = sample.get("day")
        node_index = sample.get("node_index")
        for row, column in zip(rows.tolist()[:limit - len(found)],
                               columns.tolist()[:limit - len(found)], strict=True):
            found.append((_name(dates, _at(day, row), date=True),
                          _name(nodes, _at(node_index, row)), _name(features, column)))
    return found, total - len(found)


def _samples(batch) -> list:
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]


def _at(values, row: int) -> Optional[int]:
    if not torch.is_tensor(values):
        return None
    return int(values.reshape(-1)[row if values.numel() > 1 else 0])


def _name(names, index: Optional[int], date: bool = False) -> str:
    if index is None:
        return "?"
    try:
        name = names[index]
    except (TypeError, IndexError, KeyError):
        return str(index)
    return name.strftime("%Y-%m-%d") if date and hasattr(name, "strftime") else str(name)


def _describe_inputs(found: list, more: int) -> str:
    if not found:
        return "No non-finite input features in the batch."
    listed = "; ".join(f"({day}, {node}, {feature})" for day, node, feature in found)
    extra = f" and {more} more" if more else ""
    return f"Non-finite input features (day, node, feature): {listed}{extra}."


def _input_names(trainer: L.Trainer) -> tuple:
    """Calendar, node and feature names of the data module, where it exposes them."""
    datamodule = getattr(trainer, "datamodule", None)
    names = []
    for getter in (lambda: datamodule.dates, lambda: datamodule.nodes,
                   lambda: datamodule.market.builder.feature_names):
        try:
            names.append(getter())
        except Exception:  # names are a courtesy: indices are shown instead
            names.append(None)
    return tuple(names)


def _has_grad_scaler(trainer: L.Trainer) -> bool:
    return getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None


def _save_nan_checkpoint(manager, trainer, pl_module, info: dict) -> Optional[Path]:
    if manager is None:
        return None
    try:
        return manager.save_nan_checkpoint(trainer, pl_module, info)
    except Exception as error:  # the manager reports its own failures; never end the run
        log.warning("Could not write the NaN checkpoint: %s", error)
        return None
