"""Adjacency from groups and correlations; center samplers; the epoch-seeded order."""

import numpy as np
import pytest

from datamodules import graph as graphs
from datamodules.datasets import SampledDayDataset
from datamodules.loading import load_groups, load_panel
from datamodules.market_datamodule import MarketDataModule
from datamodules.samplers import EpochShuffleSampler, center_probabilities, draw_centers


def test_group_adjacency_links_same_group_and_leaves_na_alone(tiny_market):
    panel = load_panel(tiny_market)
    groups = load_groups(tiny_market / "sectors.csv", panel.nodes)
    assert groups[-1] is None  # "n/a" is no group
    adjacency = graphs.group_adjacency(groups)
    assert adjacency[0, 1] and adjacency[1, 2] and adjacency[9, 10]
    assert not adjacency[0, 3] and not adjacency[2, 2]
    assert not adjacency[11].any() and not adjacency[:, 11].any()
    edges = graphs.edges_with_self_loops(adjacency)
    assert edges.shape == (2, 3 * 6 + 2 + 12)  # 3 triads, 1 pair, 12 self-loops
    assert {(i, i) for i in range(12)} <= set(map(tuple, edges.T))


def test_correlation_adjacency_picks_the_most_correlated():
    rng = np.random.default_rng(1)
    common = rng.normal(size=(300, 1))
    returns = np.hstack([common + 0.1 * rng.normal(size=(300, 2)), rng.normal(size=(300, 3))])
    adjacency = graphs.correlation_adjacency(returns, top_k=1)
    assert adjacency[0, 1] and adjacency[1, 0]
    assert adjacency.sum(axis=1).min() >= 1 and (adjacency == adjacency.T).all()


def test_induced_subgraph_renumbers_edges():
    adjacency = np.zeros((5, 5), dtype=bool)
    adjacency[0, 3] = adjacency[3, 0] = adjacency[3, 4] = adjacency[4, 3] = True
    edges = graphs.edges_with_self_loops(adjacency)
    sub = graphs.induced_subgraph(edges, np.array([0, 3]))
    assert sorted(map(tuple, sub.T)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_degree_sampler_probabilities_are_softmax_of_degree():
    degree = np.array([0, 2, 5, 5, 9])
    candidates = np.array([0, 2, 4])
    probabilities = center_probabilities(degree, candidates, "degree", temperature=2.0)
    expected = np.exp(np.array([0, 5, 9]) / 2.0)
    np.testing.assert_allclose(probabilities, expected / expected.sum())
    np.testing.assert_allclose(center_probabilities(degree, candidates, "uniform", 2.0), 1 / 3)
    with pytest.raises(ValueError, match="sampler_temperature must be > 0"):
        center_probabilities(degree, candidates, "degree", 0.0)


def test_degree_sampler_draws_match_the_probabilities(tiny_market):
    data = MarketDataModule(path=str(tiny_market), window_sizes=[5, 10], num_center_nodes=1,
                            sampler="degree", sampler_temperature=0.5, samples_per_day=400)
    data.setup()
    day = int(data.split_days["train"][0])
    dataset = SampledDayDataset(data.market, [day], 1, "degree", 0.5, 400, seed=3)
    trainable = data.market.trainable_nodes(day)
    expected = center_probabilities(data.market.degree, trainable, "degree", 0.5)
    drawn = np.zeros(data.num_nodes)
    for index in range(len(dataset)):
        rng = np.random.default_rng([3, 0, index])
        drawn[draw_centers(rng, data.market.degree, trainable, 1, "degree", 0.5)] += 1
    np.testing.assert_allclose(drawn[trainable] / 400, expected, atol=0.06)
    # a sample holds its center's 1-hop neighbours: degree-2 triads give 3 nodes
    sizes = {len(dataset[(0, i)]["node_index"]) for i in range(20)}
    assert sizes <= {2, 3}


def test_sequential_sampler_covers_every_node_once_per_day(tiny_market):
    data = MarketDataModule(path=str(tiny_market), window_sizes=[5, 10], num_center_nodes=5,
                            sampler="sequential")
    data.setup()
    days = data.split_days["train"][:3]
    dataset = SampledDayDataset(data.market, days, 5, "sequential", 1.0, 1, seed=0)
    centers_per_day = {int(day): [] for day in days}
    for day, centers in dataset.items:
        centers_per_day[day].extend(centers.tolist())
    for day, centers in centers_per_day.items():
        assert sorted(centers) == data.market.trainable_nodes(day).tolist()
    assert len(dataset) == 3 * 3  # 12 nodes in chunks of 5


def test_day_sample_has_one_day_and_loss_nodes_have_labels(tiny_market):
    data = MarketDataModule(path=str(tiny_market), window_sizes=[5, 10], batch_size=4)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, list) and len(batch) == 4
    for sample in batch:
        assert sample["day"].dim() == 0
        assert sample["x"].shape[1:] == (10, 3)  # log return, close, volume
        assert int(sample["edge_index"].max()) < len(sample["node_index"])
        day = int(sample["day"])
        expected = data.market.labels[day, sample["node_index"].numpy()]
        np.testing.assert_array_equal(sample["label"].numpy(), expected)


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    sampler = EpochShuffleSampler(50, seed=7)
    first = list(sampler)
    assert list(EpochShuffleSampler(50, seed=7)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and all(epoch == 1 for epoch, _ in second)
    assert sorted(index for _, index in second) == list(range(50))
