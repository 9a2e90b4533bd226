"""Graphs over the nodes of a universe: which nodes exchange messages.

A graph is stored as an edge list ``(2, edges)`` of (source, target) node positions that
always holds one self-loop per node, so that attention over a node's incoming edges includes
the node itself. Memory grows with the number of edges, never with nodes squared.
"""

import logging

import numpy as np

log = logging.getLogger(__name__)


def group_adjacency(groups: np.ndarray) -> np.ndarray:
    """Edges between distinct nodes of the same group; a node whose group is None has none.

    Args:
        groups: group label per node, ``None`` for no group.  # (nodes,)

    Returns:
        Symmetric boolean adjacency without self-loops.  # (nodes, nodes)
    """
    labels = np.array(["" if group is None else str(group) for group in groups], dtype=object)
    has_group = np.array([group is not None for group in groups])
    adjacency = (labels[:, None] == labels[None, :]) & has_group[:, None] & has_group[None, :]
    np.fill_diagonal(adjacency, False)
    return adjacency


def correlation_adjacency(returns: np.ndarray, top_k: int) -> np.ndarray:
    """Link each node to the ``top_k`` nodes whose returns correlate most with its own.

    Only pass returns of training dates: a graph built from later returns looks ahead.

    Args:
        returns: daily returns, NaN where missing.  # (days, nodes)
        top_k: neighbours per node (made symmetric afterwards).

    Returns:
        Symmetric boolean adjacency without self-loops.  # (nodes, nodes)
    """
    num_nodes = returns.shape[1]
    if top_k < 1:
        raise ValueError(f"correlation_top_k must be >= 1, got {top_k}.")

    valid = np.isfinite(returns)
    centred = np.where(valid, returns - np.nanmean(returns, axis=0), 0.0)
    covariance = centred.T @ centred  # (nodes, nodes)
    scale = np.sqrt(np.diag(covariance))
    with np.errstate(invalid="ignore", divide="ignore"):
        correlation = covariance / np.outer(scale, scale)
    correlation = np.nan_to_num(correlation, nan=-np.inf)
    np.fill_diagonal(correlation, -np.inf)

    k = min(top_k, num_nodes - 1)
    nearest = np.argpartition(-correlation, kth=k - 1, axis=1)[:, :k]  # (nodes, k)
    adjacency = np.zeros((num_nodes, num_nodes), dtype=bool)
    adjacency[np.repeat(np.arange(num_nodes), k), nearest.ravel()] = True
    adjacency |= adjacency.T
    np.fill_diagonal(adjacency, False)
    return adjacency


def edges_with_self_loops(adjacency: np.ndarray) -> np.ndarray:
    """Edge list of an adjacency matrix plus one self-loop per node, sorted by target.

    Returns:
        int64 array of (source, target) rows.  # (2, edges)
    """
    adjacency = adjacency.copy()
    np.fill_diagonal(adjacency, True)
    target, source = np.nonzero(adjacency)
    return np.stack([source, target]).astype(np.int64)


def induced_subgraph(edge_index: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Edges among ``active`` nodes, renumbered to positions within ``active``.

    Args:
        edge_index: edges of the whole graph.  # (2, edges)
        active: sorted node positions kept.  # (active,)

    Returns:
        Edge list over 0..len(active)-1.  # (2, kept_edges)
    """
    position = np.full(edge_index.max(initial=-1) + 1, -1, dtype=np.int64)
    position[active] = np.arange(len(active))
    source, target = position[edge_index[0]], position[edge_index[1]]
    keep = (source >= 0) & (target >= 0)
    return np.stack([source[keep], target[keep]])


def describe(adjacency: np.ndarray) -> str:
    """One line for the log: nodes, edges, density and isolated nodes."""
    num_nodes = adjacency.shape[0]
    degree = adjacency.sum(axis=1)
    edges = int(degree.sum())
    density = edges / max(num_nodes * (num_nodes - 1), 1)
    return (f"{num_nodes} nodes, {edges} directed edges (density {density:.1%}), "
            f"{int((degree == 0).sum())} nodes without neighbours")
