"""What a checkpoint remembers besides the weights: metric histories, random-number state and
the training sampler's position.

Everything here is made of plain Python values (and CPU tensors), so a file that holds it loads
with ``torch.load(path, weights_only=True)``, the default of Lightning 2.6 on torch >= 2.6.
"""

import logging
import math
import random
from pathlib import PurePath

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)

# history key -> logged metric name, per history; ``epoch`` and ``lr`` are added separately.
TRAIN_HISTORY_METRICS = {
    "loss": "train_loss",
    "accuracy": "train_accuracy",
    "gate_mean": "train_gate_mean",
    "gate_std": "train_gate_std",
    "favor_time_ratio": "train_favor_time_ratio",
}
VAL_HISTORY_METRICS = {
    "loss": "val_loss",
    "accuracy": "val_accuracy",
    "IC": "val_IC",
    "RankIC": "val_RankIC",
    "ICIR": "val_ICIR",
    "RankICIR": "val_RankICIR",
    "gate_mean": "gate_mean",
    "gate_std": "gate_std",
    "favor_time_ratio": "favor_time_ratio",
}


def metric_value(metrics: dict, name: str) -> float:
    """``metrics[name]`` as a Python float; NaN when it was not logged."""
    value = metrics.get(name)
    if value is None:
        return math.nan
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class MetricHistory:
    """Per-epoch lists of the training and validation metrics, in the user's layout.

    ``train['loss'][i]`` and ``val['loss'][i]`` belong to epoch ``train['epoch'][i]``; an epoch
    without validation holds NaN in the validation lists, so the lists stay aligned and plot
    against each other. ``train['lr']`` is the learning rate the epoch trained with.

    Args:
        max_epochs: epochs kept (the newest); None keeps all, 0 keeps none.
    """

    def __init__(self, max_epochs: int | None = None):
        if max_epochs is not None and max_epochs < 0:
            raise ValueError(f"training.history_max_epochs must be >= 0 or null, got {max_epochs}.")
        self.max_epochs = max_epochs
        self.train = self._empty(TRAIN_HISTORY_METRICS, extra=("lr",))
        self.val = self._empty(VAL_HISTORY_METRICS)

    @staticmethod
    def _empty(metrics: dict, extra=()) -> dict:
        return {key: [] for key in ("epoch", *metrics, *extra)}

    def record(self, epoch: int, metrics: dict, learning_rate: float, validated: bool) -> None:
        """Append epoch ``epoch``; validation values are NaN when ``validated`` is false."""
        self._drop_epoch(epoch)
        self.train["epoch"].append(epoch)
        self.train["lr"].append(float(learning_rate))
        for key, name in TRAIN_HISTORY_METRICS.items():
            self.train[key].append(metric_value(metrics, name))
        self.val["epoch"].append(epoch)
        for key, name in VAL_HISTORY_METRICS.items():
            self.val[key].append(metric_value(metrics, name) if validated else math.nan)
        self._bound()

    def _drop_epoch(self, epoch: int) -> None:
        # A run resumed from an earlier file than the newest replays epochs: the replay wins.
        while self.train["epoch"] and self.train["epoch"][-1] >= epoch:
            for history in (self.train, self.val):
                for values in history.values():
                    values.pop()

    def _bound(self) -> None:
        if self.max_epochs is None:
            return
        for history in (self.train, self.val):
            for values in history.values():
                # In place: the checkpoint refers to these very lists twice (top level and
                # callback state), and pickle stores an object referred to twice only once.
                del values[:max(len(values) - self.max_epochs, 0)]

    def state_dict(self) -> dict:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        for target, source in ((self.train, state.get("train", {})),
                               (self.val, state.get("val", {}))):
            length = len(source.get("epoch", []))
            for key in target:
                values = list(source.get(key, []))
                # A key added since the file was written is padded so the lists stay aligned.
                target[key] = values if len(values) == length else [math.nan] * length
        self._bound()


def capture_rng_state() -> dict:
    """The global random state of torch (CPU and CUDA), NumPy and Python, as plain values."""
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(bit_generator),
                  "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "position": int(position), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    # TODO(MPS random state): torch.mps has its own generator; Apple runs resume with a fresh one.
    return state


def restore_rng_state(state: dict) -> None:
    """Set the global random state from :func:`capture_rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["bit_generator"],
                         numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]),
                     python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("The checkpoint holds the random state of %d CUDA devices, this machine "
                        "has %d: CUDA random numbers start afresh.", len(cuda_states),
                        torch.cuda.device_count())


def gather_rng_states(trainer) -> list | None:
    """Every rank's :func:`capture_rng_state`, by global rank; None with a single process.

    A collective under several processes: every rank must call it at the same point.
    """
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    states = [None] * trainer.world_size
    dist.all_gather_object(states, capture_rng_state())
    return [_cpu(state) for state in states]


def rng_state_for_rank(state: dict, rank: int, world_size: int) -> dict | None:
    """The random state rank ``rank`` resumes with, from a checkpoint manager's state: its own
    when the file holds one per rank of a run of the same size, else rank 0's ``rng``."""
    per_rank = state.get("rng_ranks")
    if per_rank and len(per_rank) == world_size:
        return per_rank[rank]
    if per_rank and rank == 0:
        rank_zero_warn(f"The checkpoint holds the random state of {len(per_rank)} processes and "
                       f"this run has {world_size}: every process resumes with rank 0's, so "
                       "dropout draws differ from an uninterrupted run.")
    return state.get("rng")


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(item) for item in value)
    return value


def training_sampler(trainer):
    """The training loader's sampler when it keeps a position (``state_dict(consumed)``,
    ``load_state_dict`` and ``set_epoch``, as ``EpochShuffleSampler``); None otherwise."""
    loader = getattr(trainer, "train_dataloader", None)
    for sampler in (getattr(loader, "sampler", None),
                    getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if all(callable(getattr(sampler, name, None))
               for name in ("state_dict", "load_state_dict", "set_epoch")):
            return sampler
    return None


def sampler_position(trainer) -> dict | None:
    """The training sampler's position after the batches this epoch has trained so far.

    The sampler deals a distributed epoch out by position (rank ``r`` takes ``r, r + W, ...``),
    so after ``b`` batches of size ``B`` on each of ``W`` ranks the first ``b * B * W`` positions
    of the epoch's order are done. None without a sampler that keeps a position.
    """
    sampler = training_sampler(trainer)
    loader = getattr(trainer, "train_dataloader", None)
    batch_size = getattr(loader, "batch_size", None)
    if sampler is None or not batch_size:
        return None
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
    return {**sampler.state_dict(batches * batch_size * trainer.world_size),
            "world_size": trainer.world_size, "batches": batches}


def restore_sampler_position(trainer, position: dict | None) -> None:
    """Set the training sampler to the restored epoch (and position inside it, when the file was
    written inside that epoch) before its first batch is drawn.

    Lightning drew the loader's first indices before it sets the sampler's epoch (loader
    workers fetch ahead when the iterator is made), and it does not make a new iterator for the
    first epoch of a resumed run; so the iterator is made again here.
    """
    sampler = training_sampler(trainer)
    if sampler is None:
        return
    sampler.set_epoch(trainer.current_epoch)
    if position and position.get("epoch") == trainer.current_epoch:
        if position.get("world_size", trainer.world_size) != trainer.world_size:
            rank_zero_warn(f"The checkpoint was written inside epoch {position['epoch']} by "
                           f"{position['world_size']} processes and this run has "
                           f"{trainer.world_size}: the rest of that epoch is approximate (some "
                           "samples may be seen twice or not at all).")
        try:
            sampler.load_state_dict({key: value for key, value in position.items()
                                     if key not in ("world_size", "batches")})
        except ValueError as error:
            rank_zero_warn(f"Not restoring the sampler position ({error}); epoch "
                           f"{trainer.current_epoch} restarts its sample order.")
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is not None and getattr(fetcher, "_combined_loader", None) is not None:
        iter(fetcher)


def plain(value):
    """``value`` made of types ``torch.load(weights_only=True)`` accepts (for free-form info)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    return repr(value)


_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.Size,
                 torch.dtype, torch.device)


def unloadable_values(obj, prefix: str = "", limit: int = 10) -> list:
    """Key paths of the values ``torch.load(weights_only=True)`` would refuse.

    Example: ``['datamodule_hyper_parameters.path: pathlib.PosixPath']``.
    """
    found = []

    def walk(value, path):
        if len(found) >= limit:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, (str, int, float, bool, type(None))):
                    found.append(f"{path}[{key!r}] key: {type(key).__name__}")
                walk(item, f"{path}.{key}" if path else str(key))
        elif isinstance(value, (list, tuple, set)):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]")
        elif not isinstance(value, _PLAIN_LEAVES):
            found.append(f"{path}: {type(value).__module__}.{type(value).__qualname__}")

    walk(obj, prefix)
    return found
