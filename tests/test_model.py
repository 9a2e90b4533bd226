"""Model shapes in both batch formats, the gate, and edge-based attention."""

import pytest
import torch

from lit_models.batching import to_graph_batch
from lit_models.gated_gnn import EdgeGraphAttention, GatedGraphNet
from lit_models.lit_gated_gnn import GatedGNNModule


def _day(num_nodes, window=10, features=3, day=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    loops = torch.arange(num_nodes)
    ring = torch.stack([loops, (loops + 1) % num_nodes])
    return {
        "x": torch.randn(num_nodes, window, features, generator=generator),
        "bar_mask": torch.ones(num_nodes, window, dtype=torch.bool),
        "has_input": torch.ones(num_nodes, dtype=torch.bool),
        "node_index": torch.arange(num_nodes),
        "edge_index": torch.cat([torch.stack([loops, loops]), ring], dim=1),
        "label": torch.randint(0, 5, (num_nodes,), generator=generator),
        "fwd_return": torch.randn(num_nodes, generator=generator),
        "day": torch.tensor(day),
    }


def _net(**overrides):
    torch.manual_seed(0)
    settings = dict(num_nodes=30, num_features=3, window_sizes=[5, 10], num_classes=5,
                    hidden_size=16, num_heads=2, dropout=0.0)
    settings.update(overrides)
    return GatedGraphNet(**settings)


@pytest.mark.parametrize("encoder", ["gru", "transformer"])
def test_cross_sectional_batch_shapes(encoder):
    net = _net(encoder=encoder)
    graph = to_graph_batch([_day(7, day=0), _day(4, day=1)])
    assert graph.edge_index.shape == (2, 22) and graph.num_days == 2
    assert graph.day.tolist() == [0] * 7 + [1] * 4
    output = net(graph.x, graph.bar_mask, graph.has_input, graph.node_index, graph.edge_index)
    assert output.logits.shape == (11, 5) and output.scores.shape == (11,)
    assert output.gate.shape == (11,)
    assert ((output.scores >= 0) & (output.scores <= 4)).all()
    probabilities = torch.softmax(output.logits, dim=-1)
    torch.testing.assert_close(output.scores, probabilities @ torch.arange(5.0))


def test_pooled_batch_shapes():
    day = _day(6)
    pooled = {key: value for key, value in day.items() if key != "edge_index"}
    pooled["day"] = torch.zeros(6, dtype=torch.int64)
    graph = to_graph_batch(pooled)
    assert graph.edge_index.tolist() == [list(range(6)), list(range(6))]
    output = _net()(graph.x, graph.bar_mask, graph.has_input, graph.node_index,
                    graph.edge_index)
    assert output.logits.shape == (6, 5)


def test_unsupported_batch_names_its_type():
    with pytest.raises(TypeError, match="Unsupported batch of type Tensor"):
        to_graph_batch(torch.zeros(3))


def test_node_without_input_carries_its_embedding_only():
    net = _net().eval()
    day = _day(5)
    day["has_input"][2] = False

    def args(d):
        return d["x"], d["bar_mask"], d["has_input"], d["node_index"], d["edge_index"]

    first = net(*args(day))
    day["x"][2] = 100.0  # the node's own history no longer matters
    loops = torch.arange(5)
    day["edge_index"] = torch.stack([loops, loops])
    alone = net(*args(day))
    day["x"][2] = -100.0
    again = net(*args(day))
    torch.testing.assert_close(alone.logits[2], again.logits[2])
    assert first.gate.shape == (4,)  # gate values only for nodes with input


def test_fixed_fusion_without_gate():
    net = _net(use_node_gate=False, embedding_fusion_alpha=0.25)
    graph = to_graph_batch([_day(5)])
    output = net(graph.x, graph.bar_mask, graph.has_input, graph.node_index, graph.edge_index)
    torch.testing.assert_close(output.gate, torch.full((5,), 0.75))


def test_attention_is_a_softmax_over_incoming_edges_only():
    torch.manual_seed(0)
    layer = EdgeGraphAttention(hidden_size=8, num_heads=2, dropout=0.0)
    hidden = torch.randn(4, 8)
    edges = torch.tensor([[0, 1, 2, 3, 1], [0, 1, 2, 3, 0]])  # node 0 hears 0 and 1
    out = layer(hidden, edges)
    changed = hidden.clone()
    changed[3] += 10.0  # node 3 sends only to itself
    out_changed = layer(changed, edges)
    torch.testing.assert_close(out[:3], out_changed[:3])
    assert not torch.allclose(out[3], out_changed[3])


def test_training_step_accepts_list_and_dict_batches():
    module = GatedGNNModule(num_nodes=30, num_features=3, window_sizes=[5, 10], hidden_size=16,
                            num_heads=2)
    list_out = module.training_step([_day(6), _day(5, day=1)], 0)
    pooled = {key: value for key, value in _day(6).items() if key != "edge_index"}
    pooled["day"] = torch.zeros(6, dtype=torch.int64)
    dict_out = module.training_step(pooled, 0)
    for out in (list_out, dict_out):
        assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert list_out["num_labelled"] == 11 and dict_out["num_labelled"] == 6


def test_batch_without_labels_gives_zero_loss_not_nan():
    module = GatedGNNModule(num_nodes=30, num_features=3, window_sizes=[5, 10], hidden_size=16,
                            num_heads=2)
    day = _day(4)
    day["label"][:] = -1
    out = module.training_step([day], 0)
    assert out["loss"].item() == 0.0 and out["num_labelled"] == 0
