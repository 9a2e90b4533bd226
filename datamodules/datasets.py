"""Torch datasets over prepared market data.

Cross-sectional mode: one sample is one day (or a sampled sub-graph of it) holding every
tensor of that day's nodes; a batch is a Python list of such day samples, since node counts
differ from day to day. Pooled mode: one sample is one (node, day) window; a batch is a dict of
stacked tensors.

A day sample is a dict:

* ``x``: normalised feature windows  # (nodes, window, features) float32
* ``bar_mask``: True where the node had a bar  # (nodes, window) bool
* ``has_input``: True where the node has a bar on the signal day  # (nodes,) bool
* ``node_index``: position of each node in the universe  # (nodes,) int64
* ``edge_index``: (source, target) edges among these nodes, self-loops included  # (2, edges)
* ``label``: quantile class, -1 where unknown  # (nodes,) int64
* ``fwd_return``: raw forward return, NaN where unknown  # (nodes,) float32
* ``day``: position of the signal day in the calendar  # () int64
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.features import NO_LABEL, FeatureBuilder
from datamodules.graph import induced_subgraph
from datamodules.samplers import draw_centers, sequential_chunks, with_neighbours


@dataclass
class PreparedMarket:
    """Everything the datasets read: features, labels and the graph of one universe."""

    builder: FeatureBuilder
    labels: np.ndarray  # (days, nodes) int64
    forward: np.ndarray  # (days, nodes) float64
    edge_index: np.ndarray  # (2, edges) with self-loops
    neighbours: list  # per node: int64 array of neighbour positions, self excluded
    degree: np.ndarray  # (nodes,)

    @property
    def num_nodes(self) -> int:
        return len(self.degree)

    def day_sample(self, day: int, nodes: np.ndarray, edge_index: np.ndarray) -> dict:
        """Tensors of ``nodes`` on signal ``day``; ``edge_index`` already renumbered."""
        features, bar_mask, has_input = self.builder.window_features(day, nodes)
        return {
            "x": torch.from_numpy(features),
            "bar_mask": torch.from_numpy(bar_mask),
            "has_input": torch.from_numpy(has_input),
            "node_index": torch.from_numpy(nodes.astype(np.int64)),
            "edge_index": torch.from_numpy(edge_index),
            "label": torch.from_numpy(self.labels[day, nodes]),
            "fwd_return": torch.from_numpy(self.forward[day, nodes].astype(np.float32)),
            "day": torch.tensor(day, dtype=torch.int64),
        }

    def trainable_nodes(self, day: int) -> np.ndarray:
        """Nodes with a label and a bar on ``day``: those worth drawing as centers."""
        has_bar = np.isfinite(self.builder.close[day])
        return np.flatnonzero((self.labels[day] != NO_LABEL) & has_bar)


class FullDayDataset(Dataset):
    """Every node of each day: validation, test and predict in cross-sectional mode."""

    def __init__(self, market: PreparedMarket, days: np.ndarray):
        self.market = market
        self.days = np.asarray(days)
        self.all_nodes = np.arange(market.num_nodes)

    def __len__(self) -> int:
        return len(self.days)

    def __getitem__(self, index: int) -> dict:
        return self.market.day_sample(int(self.days[index]), self.all_nodes,
                                      self.market.edge_index)


class SampledDayDataset(Dataset):
    """Training sub-graphs: centers drawn on each day plus their 1-hop neighbours.

    Indexed by ``(epoch, index)`` from :class:`~datamodules.samplers.EpochShuffleSampler`; the
    draw of sample ``index`` in ``epoch`` is seeded by ``(seed, epoch, index)``.
    With ``sampler='sequential'`` the day's trainable nodes are split into consecutive chunks
    of ``num_center_nodes`` and each chunk is one sample, so every node is a center once a day
    (``samples_per_day`` is then ignored).
    """

    def __init__(self, market: PreparedMarket, days: np.ndarray, num_center_nodes: int,
                 sampler: str, temperature: float, samples_per_day: int, seed: int):
        self.market = market
        self.num_center_nodes = num_center_nodes
        self.sampler = sampler
        self.temperature = temperature
        self.seed = seed
        if sampler == "sequential":
            self.items = [(int(day), chunk)
                          for day in days
                          for chunk in sequential_chunks(market.trainable_nodes(day),
                                                         num_center_nodes)]
        else:
            self.items = [(int(day), None) for day in days for _ in range(samples_per_day)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        day, centers = self.items[index]
        if centers is None:
            rng = np.random.default_rng([self.seed, epoch, index])
            centers = draw_centers(rng, self.market.degree, self.market.trainable_nodes(day),
                                   self.num_center_nodes, self.sampler, self.temperature)
        active = with_neighbours(centers, self.market.neighbours)
        edges = induced_subgraph(self.market.edge_index, active)
        return self.market.day_sample(day, active, edges)


class PooledDataset(Dataset):
    """(node, day) windows mixed across days: pooled mode, no graph beyond self-loops."""

    def __init__(self, market: PreparedMarket, days: np.ndarray, labelled_only: bool):
        self.market = market
        pairs = []
        for day in days:
            nodes = (market.trainable_nodes(day) if labelled_only
                     else np.arange(market.num_nodes))
            pairs.append(np.stack([np.full(len(nodes), day), nodes], axis=1))
        self.pairs = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> dict:
        index = key[1] if isinstance(key, tuple) else key
        day, node = map(int, self.pairs[index])
        sample = self.market.day_sample(day, np.array([node]), np.zeros((2, 0), np.int64))
        del sample["edge_index"]
        return {name: value[0] if value.dim() > 0 else value for name, value in sample.items()}


def collate_days(samples: list) -> list:
    """A cross-sectional batch stays a list of day samples (their node counts differ)."""
    return samples
