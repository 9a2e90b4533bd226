"""The gated graph network: temporal encoder, node-embedding gate, edge graph attention, head.

For each node of a day:

1. a multi-scale temporal encoder reads the last ``w`` bars for every ``w`` in
   ``window_sizes`` (one GRU or small Transformer per scale, weights shared by all nodes) and
   fuses the scales with attention;
2. a learned node embedding ``e`` is mixed with the temporal summary ``t`` by a per-node gate
   ``g = sigmoid(MLP([t ‖ e]))``: ``h = g·t + (1−g)·e``. A node without a bar that day carries
   ``e`` alone. With ``use_node_gate=False`` the mix is fixed:
   ``h = (1−α)·t + α·e`` with ``α = embedding_fusion_alpha``;
3. graph attention passes messages along the day's edges only, so memory grows with the
   number of edges, not with nodes squared;
4. a head gives ``num_classes`` logits. The score used for IC and RankIC is the expected class
   index under the softmax, ``score = Σ_k k·p_k``, a number in ``[0, num_classes − 1]`` that
   rises with the predicted return.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ENCODERS = ("gru", "transformer")


class ModelOutput(NamedTuple):
    """What one forward pass returns.

    Attributes:
        logits: class logits per node.  # (nodes, classes)
        scores: expected class index per node, the ranking score.  # (nodes,)
        gate: share of the temporal summary for each node that had input.  # (nodes_with_input,)
    """

    logits: torch.Tensor
    scores: torch.Tensor
    gate: torch.Tensor


class ScaleEncoder(nn.Module):
    """Summarises one scale's window of bars into a vector per node."""

    def __init__(self, kind: str, input_size: int, hidden_size: int, window: int,
                 num_heads: int, dropout: float):
        super().__init__()
        self.kind = kind
        self.input_projection = nn.Linear(input_size, hidden_size)
        if kind == "gru":
            self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        else:
            self.position = nn.Parameter(torch.zeros(window, hidden_size))
            layer = nn.TransformerEncoderLayer(hidden_size, num_heads, 2 * hidden_size,
                                               dropout, batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, num_layers=1,
                                                     enable_nested_tensor=False)

    def forward(self, steps: torch.Tensor, bar_mask: torch.Tensor) -> torch.Tensor:
        """steps (nodes, window, input), bar_mask (nodes, window) -> (nodes, hidden)."""
        projected = self.input_projection(steps)  # (nodes, window, hidden)
        if self.kind == "gru":
            _, last_hidden = self.gru(projected)  # (1, nodes, hidden)
            return last_hidden[0]

        padding = ~bar_mask
        # A node with no bar in the window attends to every step rather than to none (NaN).
        padding = padding & ~padding.all(dim=1, keepdim=True)
        encoded = self.transformer(projected + self.position, src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).float()
        return (encoded * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class MultiScaleEncoder(nn.Module):
    """One encoder per window length, fused by attention over the scales."""

    def __init__(self, num_features: int, window_sizes: list, hidden_size: int, kind: str,
                 num_heads: int, dropout: float):
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {kind!r}.")
        self.window_sizes = sorted(window_sizes)
        input_size = num_features + 1  # the bar mask is an input channel too
        self.scales = nn.ModuleList(
            ScaleEncoder(kind, input_size, hidden_size, window, num_heads, dropout)
            for window in self.window_sizes
        )
        self.scale_attention = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, 1)
        )

    def forward(self, x: torch.Tensor, bar_mask: torch.Tensor) -> torch.Tensor:
        """x (nodes, window, features), bar_mask (nodes, window) -> (nodes, hidden)."""
        steps = torch.cat([x, bar_mask.unsqueeze(-1).to(x.dtype)], dim=-1)
        summaries = torch.stack(
            [encoder(steps[:, -window:], bar_mask[:, -window:])
             for window, encoder in zip(self.window_sizes, self.scales)],
            dim=1,
        )  # (nodes, scales, hidden)
        weights = torch.softmax(self.scale_attention(summaries), dim=1)  # (nodes, scales, 1)
        return (weights * summaries).sum(dim=1)


class EdgeGraphAttention(nn.Module):
    """Multi-head graph attention over an edge list (GAT-style scores, softmax per target).

    Cost is O(edges · hidden): scores, weights and messages exist per edge only.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.head_size = hidden_size // num_heads
        self.projection = nn.Linear(hidden_size, hidden_size, bias=False)
        self.source_score = nn.Parameter(torch.empty(num_heads, self.head_size))
        self.target_score = nn.Parameter(torch.empty(num_heads, self.head_size))
        nn.init.xavier_uniform_(self.source_score)
        nn.init.xavier_uniform_(self.target_score)
        self.output = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """hidden (nodes, hidden), edge_index (2, edges) with self-loops -> (nodes, hidden)."""
        num_nodes = hidden.size(0)
        source, target = edge_index
        values = self.projection(hidden).view(num_nodes, self.num_heads, self.head_size)

        source_part = (values * self.source_score).sum(-1)  # (nodes, heads)
        target_part = (values * self.target_score).sum(-1)
        edge_score = F.leaky_relu(source_part[source] + target_part[target], 0.2)  # (edges, heads)

        index = target.unsqueeze(-1).expand_as(edge_score)
        top = torch.full((num_nodes, self.num_heads), -math.inf, device=hidden.device,
                         dtype=edge_score.dtype)
        top = top.scatter_reduce(0, index, edge_score, reduce="amax", include_self=True)
        weight = torch.exp(edge_score - top[target])  # (edges, heads)
        total = torch.zeros_like(top).index_add_(0, target, weight)
        attention = self.dropout(weight / total[target].clamp(min=1e-12))

        messages = values[source] * attention.unsqueeze(-1)  # (edges, heads, head_size)
        gathered = torch.zeros_like(values).index_add_(0, target, messages)
        return self.output(gathered.reshape(num_nodes, -1))


class GatedGraphNet(nn.Module):
    """The bare model: loadable with ``load_state_dict`` without Lightning.

    Args:
        num_nodes: nodes in the universe (rows of the node embedding).
        num_features: feature channels per bar.
        window_sizes: lookback of each temporal scale, in bars.
        num_classes: output classes.
        hidden_size: width of every hidden vector.
        encoder: ``gru`` or ``transformer``.
        num_heads: attention heads of the graph layers (and Transformer encoders).
        num_graph_layers: graph attention layers, each residual with layer norm.
        use_node_gate: learn a per-node gate; False mixes with ``embedding_fusion_alpha``.
        embedding_fusion_alpha: fixed weight of the embedding when the gate is off.
        dropout: dropout rate.
    """

    def __init__(self, num_nodes: int, num_features: int, window_sizes: list,
                 num_classes: int = 5, hidden_size: int = 64, encoder: str = "gru",
                 num_heads: int = 4, num_graph_layers: int = 1, use_node_gate: bool = True,
                 embedding_fusion_alpha: float = 0.5, dropout: float = 0.1):
        super().__init__()
        if not 0.0 <= embedding_fusion_alpha <= 1.0:
            raise ValueError(
                f"embedding_fusion_alpha must lie in [0, 1], got {embedding_fusion_alpha}.")
        self.num_classes = num_classes
        self.use_node_gate = use_node_gate
        self.embedding_fusion_alpha = embedding_fusion_alpha
        self.temporal = MultiScaleEncoder(num_features, window_sizes, hidden_size, encoder,
                                          num_heads, dropout)
        self.node_embedding = nn.Embedding(num_nodes, hidden_size)
        self.gate = nn.Sequential(
            nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 1)
        )
        self.graph_layers = nn.ModuleList(
            EdgeGraphAttention(hidden_size, num_heads, dropout) for _ in range(num_graph_layers)
        )
        self.graph_norms = nn.ModuleList(nn.LayerNorm(hidden_size)
                                         for _ in range(num_graph_layers))
        self.head = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden_size, num_classes),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bar_mask: torch.Tensor, has_input: torch.Tensor,
                node_index: torch.Tensor, edge_index: torch.Tensor) -> ModelOutput:
        """Score every node of one graph (a day, a sub-graph, or several days side by side).

        Args:
            x: feature windows.  # (nodes, window, features)
            bar_mask: True where a bar exists.  # (nodes, window)
            has_input: True where the node has a bar on the signal day.  # (nodes,)
            node_index: position of each node in the universe.  # (nodes,)
            edge_index: (source, target) rows over 0..nodes-1, self-loops included.  # (2, E)
        """
        temporal = self.temporal(x, bar_mask)  # (nodes, hidden)
        embedding = self.node_embedding(node_index)  # (nodes, hidden)
        if self.use_node_gate:
            gate = torch.sigmoid(self.gate(torch.cat([temporal, embedding], dim=-1)))  # (nodes, 1)
        else:
            gate = torch.full_like(temporal[:, :1], 1.0 - self.embedding_fusion_alpha)
        fused = gate * temporal + (1.0 - gate) * embedding
        hidden = torch.where(has_input.unsqueeze(-1), fused, embedding)  # (nodes, hidden)

        for attention, norm in zip(self.graph_layers, self.graph_norms):
            hidden = norm(hidden + self.dropout(attention(hidden, edge_index)))

        logits = self.head(hidden)  # (nodes, classes)
        classes = torch.arange(self.num_classes, device=logits.device, dtype=logits.dtype)
        scores = (torch.softmax(logits, dim=-1) * classes).sum(dim=-1)  # (nodes,)
        return ModelOutput(logits, scores, gate[has_input, 0])
