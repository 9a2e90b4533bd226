"""Peak memory and step time of one full day against the number of nodes per day.

Each size runs in its own process (peak RSS, ``ru_maxrss``, never goes down within a
process, and Python's tracemalloc does not see torch's allocations). A worker builds the
model of ``configs/default_config.yaml`` (hidden size, heads, graph layers, encoder, windows;
six features as in the OHLCV data), one synthetic day of ``nodes`` nodes whose graph links every
pair of nodes in the same group (sector-like, group sizes drawn at random) plus self-loops,
then times a training step: forward over every node, cross-entropy, backward, AdamW step.

Reported per size: edges, peak RSS of the process, the step's own share of it (peak after
the steps minus peak before the first one) and the median step time. For contrast, the
size of one dense ``nodes x nodes x hidden`` float32 tensor, what attention over all pairs
would hold per layer.

Run: ``python bench/scale.py [--sizes 100:11 500:11 1737:130 5000:130 5000:11]
[--hidden_size 64]`` (``nodes:groups`` pairs; the hidden size defaults to the config's).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import DEFAULT_CONFIG, REPO_ROOT, machine_line, print_table, set_threads

DEFAULT_SIZES = ["100:11", "500:11", "1737:130", "5000:130", "5000:11"]
NUM_FEATURES = 6  # OHLCV data: log return, open/high/low relative to close, volume change, ...
TIMED_STEPS = 3
MODEL_KEYS = ("hidden_size", "encoder", "num_heads", "num_graph_layers", "use_node_gate",
              "dropout")


def default_model_settings(hidden_size=None) -> dict:
    """The model section of the default config, plus its windows and number of classes;
    ``hidden_size`` replaces the config's when given."""
    import yaml

    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    settings = {key: config["model"][key] for key in MODEL_KEYS if key in config["model"]}
    settings["window_sizes"] = list(config["data"]["window_sizes"])
    settings["num_classes"] = int(config["data"]["num_classes"])
    if hidden_size is not None:
        settings["hidden_size"] = hidden_size
    return settings


def sector_edges(num_nodes: int, num_groups: int, seed: int = 0):
    """Edges between every ordered pair of nodes of the same group, plus one self-loop each.

    Group sizes are uneven, like sectors: each node's group is drawn with probabilities
    proportional to ``1 / sqrt(rank)``.

    Returns:
        ``(2, edges)`` int64 tensor.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.sqrt(np.arange(1, num_groups + 1))
    groups = rng.choice(num_groups, size=num_nodes, p=weights / weights.sum())
    pieces = []
    for group in range(num_groups):
        members = np.flatnonzero(groups == group)
        source, target = np.meshgrid(members, members, indexing="ij")
        pieces.append(np.stack([source.ravel(), target.ravel()]))  # self-loops included
    return torch.from_numpy(np.concatenate(pieces, axis=1).astype(np.int64))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_day(num_nodes: int, num_groups: int, threads: int, hidden_size=None) -> dict:
    """Build the model and one synthetic day, then time training steps (in this process)."""
    import torch
    import torch.nn.functional as F

    from lit_models.gated_gnn import GatedGraphNet

    set_threads(threads)
    torch.manual_seed(0)
    settings = default_model_settings(hidden_size)
    num_classes = settings["num_classes"]
    window = max(settings["window_sizes"])
    model = GatedGraphNet(num_nodes, NUM_FEATURES, **settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    x = torch.randn(num_nodes, window, NUM_FEATURES)  # (nodes, window, features)
    bar_mask = torch.ones(num_nodes, window, dtype=torch.bool)
    has_input = torch.ones(num_nodes, dtype=torch.bool)
    node_index = torch.arange(num_nodes)
    edge_index = sector_edges(num_nodes, num_groups)
    label = torch.randint(0, num_classes, (num_nodes,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        output = model(x, bar_mask, has_input, node_index, edge_index)
        F.cross_entropy(output.logits, label).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    before = peak_rss_mb()
    times = []
    for _ in range(1 + TIMED_STEPS):  # the first step (allocator and thread warm-up) is untimed
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    return {"nodes": num_nodes, "groups": num_groups, "edges": int(edge_index.shape[1]),
            "peak_mb": peak, "step_mb": peak - before,
            "step_s": sorted(times[1:])[len(times[1:]) // 2]}


def run_worker(num_nodes: int, num_groups: int, threads: int, hidden_size=None) -> dict:
    """Measure one size in a fresh Python process and return its numbers."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker",
               f"--sizes={num_nodes}:{num_groups}", f"--threads={threads}"]
    if hidden_size is not None:
        command.append(f"--hidden_size={hidden_size}")
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        return {"nodes": num_nodes, "groups": num_groups,
                "error": (completed.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES,
                        help="nodes:groups pairs, one process each")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden_size", type=int, default=None,
                        help="replace the default config's model.hidden_size")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [tuple(int(part) for part in size.split(":")) for size in args.sizes]

    if args.worker:
        print(json.dumps(measure_day(*sizes[0], args.threads, args.hidden_size)))
        return

    settings = default_model_settings(args.hidden_size)
    hidden_size = settings["hidden_size"]
    rows = []
    for num_nodes, num_groups in sizes:
        result = run_worker(num_nodes, num_groups, args.threads, args.hidden_size)
        if "error" in result:
            rows.append([num_nodes, num_groups, "-", "-", "-", "-", "-", result["error"]])
            continue
        dense_mb = num_nodes ** 2 * hidden_size * 4 / 2 ** 20
        rows.append([
            num_nodes, num_groups, f"{result['edges']:,}",
            f"{result['edges'] / num_nodes ** 2:.1%}",
            f"{result['peak_mb']:,.0f}", f"{result['step_mb']:,.0f}",
            f"{result['step_s']:.3f}", f"{dense_mb:,.0f}",
        ])
    print(machine_line(args.threads))
    print(f"Model of the default config ({settings}, {NUM_FEATURES} features); one full day "
          f"per step; median of {TIMED_STEPS} steps after one warm-up")
    print()
    print_table(["nodes", "groups", "edges (with self-loops)", "edges / nodes^2",
                 "peak RSS MB", "step's own peak MB", "step seconds",
                 "dense nodes^2 x hidden tensor MB"], rows)


if __name__ == "__main__":
    main()
