"""Turn any batch the data module produces into one graph the model can read.

Two batch formats reach a step, and both are accepted (a list batch has no ``.to``):

* cross-sectional: a Python list of day samples (dicts; see ``datamodules.datasets``), or a
  single day sample. The days are laid side by side as one graph with disjoint edge sets;
* pooled: a dict of stacked tensors, one row per (node, day) sample, with no ``edge_index``.
  Each row becomes a node with a self-loop only.
"""

from dataclasses import dataclass

import torch


@dataclass
class GraphBatch:
    """Nodes of one or more days, flattened.

    Attributes:
        x: feature windows.  # (nodes, window, features)
        bar_mask: True where a bar exists.  # (nodes, window)
        has_input: True where the node has a bar on its signal day.  # (nodes,)
        node_index: position of each node in the universe.  # (nodes,)
        edge_index: edges over 0..nodes-1, self-loops included.  # (2, edges)
        label: quantile class, -1 where unknown.  # (nodes,)
        fwd_return: raw forward return, NaN where unknown.  # (nodes,)
        day: signal day of each node.  # (nodes,)
        num_days: distinct days in the batch (samples in pooled mode).
    """

    x: torch.Tensor
    bar_mask: torch.Tensor
    has_input: torch.Tensor
    node_index: torch.Tensor
    edge_index: torch.Tensor
    label: torch.Tensor
    fwd_return: torch.Tensor
    day: torch.Tensor
    num_days: int

    @property
    def labelled(self) -> torch.Tensor:
        return self.label >= 0


def to_graph_batch(batch) -> GraphBatch:
    """Accept a list of day samples, one day sample, or a pooled dict of stacked tensors.

    Raises:
        TypeError: the batch is none of these, naming what was received.
    """
    if isinstance(batch, GraphBatch):
        return batch
    if isinstance(batch, dict) and "edge_index" in batch:
        return _join_days([batch])
    if isinstance(batch, dict):
        return _pooled(batch)
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(s, dict) for s in batch):
        return _join_days(list(batch))
    raise TypeError(
        f"Unsupported batch of type {type(batch).__name__}: expected a list of day samples "
        f"(cross-sectional mode), one day sample, or a dict of stacked tensors (pooled mode)."
    )


def _join_days(days: list) -> GraphBatch:
    offsets, total = [], 0
    for sample in days:
        offsets.append(total)
        total += sample["x"].shape[0]
    edge_index = torch.cat([s["edge_index"] + offset for s, offset in zip(days, offsets)], dim=1)
    day = torch.cat([s["day"].reshape(1).expand(s["x"].shape[0]) for s in days])
    return GraphBatch(
        x=torch.cat([s["x"] for s in days]),
        bar_mask=torch.cat([s["bar_mask"] for s in days]),
        has_input=torch.cat([s["has_input"] for s in days]),
        node_index=torch.cat([s["node_index"] for s in days]),
        edge_index=edge_index,
        label=torch.cat([s["label"] for s in days]),
        fwd_return=torch.cat([s["fwd_return"] for s in days]),
        day=day,
        num_days=len(days),
    )


def _pooled(batch: dict) -> GraphBatch:
    num_rows = batch["x"].shape[0]
    rows = torch.arange(num_rows, device=batch["x"].device)
    return GraphBatch(
        x=batch["x"],
        bar_mask=batch["bar_mask"],
        has_input=batch["has_input"],
        node_index=batch["node_index"],
        edge_index=torch.stack([rows, rows]),
        label=batch["label"],
        fwd_return=batch["fwd_return"],
        day=batch["day"],
        num_days=num_rows,
    )
