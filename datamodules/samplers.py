"""Which nodes of a day a training sample looks at, and in which order samples come.

Cross-sectional training does not feed the whole day at once: each sample draws a few center
nodes and adds their 1-hop neighbours, and the loss is taken on those active nodes.
"""

import numpy as np
import torch
from torch.utils.data import Sampler

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


class EpochShuffleSampler(Sampler):
    """Shuffles sample indices with a seed derived from (seed, epoch) and yields
    ``(epoch, index)`` pairs, so each sample can seed its own random draws.

    The order and every draw then depend only on (seed, epoch, index), never on a global
    random state or on which worker process builds the sample: a run resumed at epoch ``e``
    sees exactly the samples an uninterrupted run would. Lightning calls :meth:`set_epoch`
    at the start of every training epoch.

    Position: :meth:`state_dict` records the epoch and how many positions of its order were
    consumed; after :meth:`load_state_dict`, the next iteration over that epoch yields the
    positions not yet consumed first, then the consumed ones. The length never changes, so
    Lightning's distributed wrapper, which deals the whole order out to the ranks by position
    (rank ``r`` takes positions ``r, r + W, ...``), keeps dealing each rank its own remaining
    samples; the training loop stops after the epoch's batch count, before the consumed tail.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._resume: tuple | None = None  # (epoch, consumed positions) for the next iteration

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch:
            consumed = resume[1]
            order = order[consumed:] + order[:consumed]
        return iter([(self.epoch, index) for index in order])

    def state_dict(self, consumed: int = 0) -> dict:
        """The sampler's position as plain values.

        Args:
            consumed: positions of this epoch's order already trained on. The sampler cannot
                count them itself: loaders fetch ahead and the distributed wrapper reads the
                whole order at once, so the training loop says how far it got.
        """
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed must be in [0, {self.num_samples}], got {consumed}.")
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
        self._resume = (self.epoch, consumed) if 0 < consumed < self.num_samples else None

