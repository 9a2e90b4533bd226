"""Which nodes of a day a training sample looks at, and in which order samples come.

Cross-sectional training does not feed the whole day at once: each sample draws a few center
nodes and adds their 1-hop neighbours, and the loss is taken on those active nodes.
"""

import math

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

SAMPLERS = ("degree", "uniform", "sequential")


def center_probabilities(degree: np.ndarray, candidates: np.ndarray, sampler: str,
                         temperature: float) -> np.ndarray:
    """Probability of drawing each candidate as a center.

    ``degree``: softmax(degree / temperature) over the candidates, so well-connected nodes,
    whose samples carry more neighbours, are drawn more often. ``uniform``: equal.

    Args:
        degree: neighbours per node, self excluded.  # (nodes,)
        candidates: positions of the nodes that may be drawn.  # (candidates,)
        sampler: ``degree`` or ``uniform``.
        temperature: softmax temperature, > 0; larger flattens the preference.

    Returns:
        Probabilities summing to 1.  # (candidates,)
    """
    if sampler == "uniform":
        return np.full(len(candidates), 1.0 / len(candidates))
    if sampler != "degree":
        raise ValueError(f"sampler must be one of {SAMPLERS} to draw centers, got {sampler!r}.")
    if temperature <= 0:
        raise ValueError(f"sampler_temperature must be > 0, got {temperature}.")
    logits = degree[candidates] / temperature
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def draw_centers(rng: np.random.Generator, degree: np.ndarray, candidates: np.ndarray,
                 num_centers: int, sampler: str, temperature: float) -> np.ndarray:
    """Draw ``num_centers`` distinct centers (all candidates when there are fewer)."""
    if len(candidates) <= num_centers:
        return np.sort(candidates)
    probabilities = center_probabilities(degree, candidates, sampler, temperature)
    return np.sort(rng.choice(candidates, size=num_centers, replace=False, p=probabilities))


def sequential_chunks(candidates: np.ndarray, num_centers: int) -> list:
    """Consecutive chunks of ``num_centers`` candidates: every node is a center once a day."""
    return [candidates[start: start + num_centers]
            for start in range(0, len(candidates), num_centers)]


def with_neighbours(centers: np.ndarray, neighbours: list) -> np.ndarray:
    """Sorted union of the centers and their 1-hop neighbours."""
    parts = [centers] + [neighbours[center] for center in centers]
    return np.unique(np.concatenate(parts))


class EpochShuffleSampler(DistributedSampler):
    """Shuffles sample indices with a seed derived from (seed, epoch) and yields
    ``(epoch, index)`` pairs, so each sample can seed its own random draws.

    The order and every draw then depend only on (seed, epoch, index), never on a global
    random state or on which worker process builds the sample: a run resumed at epoch ``e``
    sees exactly the samples an uninterrupted run would. Lightning calls :meth:`set_epoch`
    at the start of every training epoch.

    Several processes: the sampler deals the epoch's order out itself, rank ``r`` of ``W``
    taking positions ``r, r + W, ...`` (the order is padded with its first positions to a
    multiple of ``W``, as torch's ``DistributedSampler`` does). It is a ``DistributedSampler``
    so that Lightning does not wrap it in its own, which would shuffle the positions again and
    make a position inside the epoch meaningless. The ranks and their number come from
    ``torch.distributed`` when it is initialized (one process otherwise), or from the arguments.

    Position: :meth:`state_dict` records the epoch and how many positions of its (padded)
    order the ranks consumed together; after :meth:`load_state_dict`, the next iteration over
    that epoch leaves each rank's consumed share out, so training continues with the next batch.

    Args:
        num_samples: samples in the data set.
        seed: seed of the order.
        shuffle: shuffle (True) or keep the data set's order.
        num_replicas: number of ranks; None reads it from ``torch.distributed``.
        rank: this process's rank; None reads it from ``torch.distributed``.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True,
                 num_replicas: int | None = None, rank: int | None = None):
        # DistributedSampler's constructor insists on a process group; nothing of it is used.
        Sampler.__init__(self)
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._num_replicas, self._rank = num_replicas, rank
        self._resume: tuple | None = None  # (epoch, consumed positions) for the next iteration

    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    @property
    def total_size(self) -> int:
        """Positions of the padded order: ``num_samples`` rounded up to a multiple of ranks."""
        return math.ceil(self.num_samples / self.num_replicas) * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total_size // self.num_replicas

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        padding = self.total_size - len(order)
        order += (order * math.ceil(padding / max(len(order), 1)))[:padding]
        share = order[self.rank::self.num_replicas]
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            share = share[resume[1] // self.num_replicas:]
        return iter([(self.epoch, index) for index in share])

    def state_dict(self, consumed: int = 0) -> dict:
        """The sampler's position as plain values.

        Args:
            consumed: positions of this epoch's padded order the ranks trained on together
                (batches x batch size x ranks). The sampler cannot count them itself: loaders
                fetch ahead of the training loop.
        """
        if not 0 <= consumed <= self.total_size:
            raise ValueError(f"consumed must be in [0, {self.total_size}], got {consumed}.")
        return {"seed": self.seed, "num_samples": self.num_samples, "shuffle": self.shuffle,
                "epoch": self.epoch, "consumed": consumed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s position at the next iteration over its epoch.

        Raises:
            ValueError: the state belongs to another order (seed, sample count or shuffling
                differ), naming the differences.
        """
        differences = [f"{key} {state.get(key)!r} in the state, {getattr(self, key)!r} here"
                       for key in ("seed", "num_samples", "shuffle")
                       if state.get(key) != getattr(self, key)]
        if differences:
            raise ValueError("The sampler position belongs to another sample order: "
                             + "; ".join(differences) + ".")
        self.epoch = int(state["epoch"])
        consumed = int(state.get("consumed", 0))
        self._resume = (self.epoch, consumed) if consumed > 0 else None
