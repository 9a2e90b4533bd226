"""Smoke tests of the benchmark scripts at tiny sizes: values, never timings."""

import sys
from pathlib import Path

import numpy as np

# bench/ is scripts, not an installed package: make it importable under plain ``pytest`` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.metric_cost import compare, synthetic_panel
from bench.scale import measure_day, sector_edges


def test_daily_ic_matches_pandas_group_by_day():
    days, scores, returns = synthetic_panel(num_days=30, num_nodes=40, seed=1)

    differences = compare(days, scores, returns)

    assert differences["daily_ic"] < 1e-9
    assert differences["daily_rank_ic"] < 1e-9
    assert differences["summary"] < 1e-9


def test_sector_edges_link_each_group_completely():
    edges = sector_edges(num_nodes=60, num_groups=5).numpy()

    pairs = set(map(tuple, edges.T))
    nodes_in_edges = np.unique(edges)
    assert len(pairs) == edges.shape[1]  # no duplicate edge
    assert all((node, node) in pairs for node in range(60))  # one self-loop per node
    assert all((target, source) in pairs for source, target in pairs)  # symmetric
    assert len(nodes_in_edges) == 60


def test_scale_worker_trains_one_synthetic_day():
    result = measure_day(num_nodes=30, num_groups=3, threads=1)

    assert result["nodes"] == 30
    assert result["edges"] >= 30
    assert result["step_s"] > 0
    assert result["peak_mb"] >= result["step_mb"] >= 0
