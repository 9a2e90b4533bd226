"""Test-split IC, RankIC, ICIR and RankICIR of the gated graph model, its ablations and a
20-day reversal factor, over several seeds.

Variants (each a real fit of the app's CLI with the default configuration plus the short
schedule below, then ``test`` on the best epoch):

* ``gated``: the default model (group graph, learned node gate);
* ``no_graph``: ``--data.graph=none`` (self-loops only, so a training sample is its centers);
* ``no_gate``: ``--model.use_node_gate=false`` (fixed mix of history and embedding);
* ``reversal``: no training; score = minus the return over the past 20 trading days
  (``close_t / close_{t-20} - 1``), on the same test days and labels (it has no seed).

The label is the app's default: horizon 1, the return from the close of t+1 to the close of
t+2 for a signal made after the close of t, with moves beyond 50 % masked. The best epoch is
the one with the highest ``val_RankIC`` (``training.monitor``), chosen by the checkpoint
manager; the test split is read once, after fit, from ``best_model.pth``.

Each invocation runs one data set and the variants asked for, and merges its numbers into a
JSON file, so the runs can be split to stay under ten minutes each; the table printed covers
every stored result of that data set.

Run: ``python bench/model_quality.py --dataset sp500_5yr --variants gated reversal`` then
``... --variants no_graph no_gate`` (and the same for ``rsr_nasdaq``).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    DEFAULT_CONFIG,
    REPO_ROOT,
    SHARED_DATA,
    build_app,
    data_folder,
    machine_line,
    print_table,
    quiet_logs,
    set_threads,
)

VARIANTS = {
    "gated": [],
    "no_graph": ["--data.graph=none"],
    "no_gate": ["--model.use_node_gate=false"],
    "reversal": None,
}
REVERSAL_DAYS = 20
METRICS = ("IC", "RankIC", "ICIR", "RankICIR")
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results" / "model_quality.json"


def schedule_arguments(args) -> list:
    """The short training schedule shared by every trained variant."""
    return [
        f"--trainer.max_epochs={args.epochs}",
        f"--trainer.limit_train_batches={args.train_batches}",
        f"--trainer.limit_val_batches={args.val_batches}",
        f"--model.learning_rate={args.learning_rate}",
        "--trainer.enable_model_summary=false",
        "--training.monitor=val_RankIC",
        "--training.mode=max",
        "--training.report=false",
        f"--data.sampler={args.sampler}",
        f"--data.num_center_nodes={args.centers}",
    ]


def fit_and_test(data: Path, variant: str, seed: int, args, workdir: Path) -> dict:
    """Fit one seed of one variant, then test its best epoch; returns the test metrics."""
    from callbacks.resume import read_summary

    extra = [f"--data.path={data}", f"--seed_everything={seed}", f"--data.seed={seed}",
             *schedule_arguments(args), *VARIANTS[variant]]
    start = time.perf_counter()
    cli = build_app(workdir / f"{variant}_{seed}", extra)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    best = cli.trainer.checkpoint_callback.best_model_path
    if not best:
        raise RuntimeError(f"{variant} seed {seed}: no best_model.pth was written (was "
                           f"val_RankIC ever finite?)")
    chosen = read_summary(best)["best"]  # monitor, mode, score and epoch of the file
    tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best,
                              verbose=False)[0]
    return {
        **{name: float(tested[f"test_{name}"]) for name in METRICS},
        "best_epoch": int(chosen["epoch"]),
        "val_RankIC": float(chosen["score"]),
        "test_days": int(tested["test_IC_days"]),
        "seconds": time.perf_counter() - start,
    }


def reversal(data: Path, workdir: Path) -> dict:
    """IC of ``-(close_t / close_{t-20} - 1)`` on the app's test days and labels."""
    from lit_models.metrics import daily_ic

    cli = build_app(workdir / "reversal", [f"--data.path={data}"])
    datamodule = cli.datamodule
    datamodule.setup("test")
    close = datamodule.panel.fields["close"]  # (days, nodes)
    days = datamodule.split_days["test"]
    with np.errstate(invalid="ignore", divide="ignore"):
        past_return = close[days] / close[days - REVERSAL_DAYS] - 1.0  # (test days, nodes)
    forward = datamodule.market.forward[days]  # (test days, nodes)
    day_ids = np.repeat(days, close.shape[1])
    result = daily_ic(day_ids, -past_return.ravel(), forward.ravel())
    return {"IC": result.ic, "RankIC": result.rank_ic, "ICIR": result.icir,
            "RankICIR": result.rank_icir, "best_epoch": None, "val_RankIC": None,
            "test_days": result.days_used, "seconds": 0.0}


def commit() -> str:
    """The short commit of the working tree (``+dirty`` with uncommitted changes)."""
    def git(*arguments) -> str:
        return subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=False).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")


def default_batch_size() -> int:
    """Days per training batch in the default config (the schedule does not change it)."""
    import yaml

    return int(yaml.safe_load(DEFAULT_CONFIG.read_text())["data"]["batch_size"])


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def store_result(path: Path, dataset: str, variant: str, seed, result: dict,
                 settings: dict) -> None:
    """Merge one result into the JSON file (read again first: runs may be split)."""
    results = load_results(path)
    entry = results.setdefault(dataset, {}).setdefault(variant, {})
    entry[str(seed)] = {**result, "settings": settings}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True))


def schedules(results: dict) -> str:
    """The distinct training schedules (and commits) behind the stored results, in words."""
    seen = set()
    for variant, runs in results.items():
        for run in runs.values():
            if variant == "reversal":
                continue
            settings = run["settings"]
            seen.add(f"{settings['epochs']} epochs x {settings['train_batches']} batches of "
                     f"{settings.get('batch_size', '?')} days, "
                     f"{settings.get('sampler', 'degree')} sampler with "
                     f"{settings.get('centers', 8)} centers, val share "
                     f"{settings['val_batches']}, lr {settings['learning_rate']}, commit "
                     f"{settings.get('commit', 'not recorded')}")
    return "; ".join(sorted(seen)) or "none"


def summary_rows(results: dict) -> list:
    rows = []
    for variant in VARIANTS:
        runs = list(results.get(variant, {}).values())
        if not runs:
            continue
        cells = []
        for name in METRICS:
            values = [run[name] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):+.4f} ± {spread:.4f}")
        epochs = ",".join(str(run["best_epoch"]) for run in runs
                          if run["best_epoch"] is not None) or "-"
        seconds = statistics.fmean(run["seconds"] for run in runs)
        seeds = "-" if variant == "reversal" else str(len(runs))
        rows.append([variant, seeds, *cells, epochs, f"{runs[0]['test_days']}",
                     f"{seconds:.0f}" if seconds else "-"])
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sp500_5yr", help="folder name under --data")
    parser.add_argument("--data", default=str(SHARED_DATA), help="folder of the real data sets")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train_batches", type=int, default=40,
                        help="training batches (of data.batch_size days) per epoch")
    parser.add_argument("--val_batches", type=float, default=0.5,
                        help="validation batches per epoch (a fraction: share of the days)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--sampler", default="degree", choices=["degree", "uniform", "sequential"],
                        help="training center sampler (data.sampler)")
    parser.add_argument("--centers", type=int, default=8,
                        help="centers per training sample (data.num_center_nodes); with "
                             "--sampler sequential and more centers than nodes, every training "
                             "sample is a whole day, for every variant alike")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSON file of results")
    parser.add_argument("--print_only", action="store_true", help="print the stored table")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    quiet_logs()
    data = data_folder(Path(args.data) / args.dataset)
    results_path = Path(args.results)
    settings = {"epochs": args.epochs, "train_batches": args.train_batches,
                "val_batches": args.val_batches, "learning_rate": args.learning_rate,
                "threads": args.threads, "commit": commit(),
                "sampler": args.sampler, "centers": args.centers,
                "batch_size": default_batch_size()}

    with tempfile.TemporaryDirectory(prefix="model_quality_") as scratch:
        workdir = Path(scratch)
        for variant in [] if args.print_only else args.variants:
            if variant == "reversal":
                store_result(results_path, args.dataset, variant, "-", reversal(data, workdir),
                             settings)
                continue
            for seed in args.seeds:
                result = fit_and_test(data, variant, seed, args, workdir)
                store_result(results_path, args.dataset, variant, seed, result, settings)
                print(f"{args.dataset} {variant} seed {seed}: " + ", ".join(
                    f"{name} {result[name]:+.4f}" for name in METRICS)
                    + f" (best epoch {result['best_epoch']}, {result['seconds']:.0f} s)",
                    file=sys.stderr, flush=True)

    print(machine_line(args.threads))
    stored = load_results(results_path).get(args.dataset, {})
    print(f"{args.dataset}, test split; label horizon 1 (close t+1 -> close t+2); best epoch "
          f"by val_RankIC; mean ± std over seeds; schedules stored: {schedules(stored)}")
    print()
    print_table(["variant", "seeds", *METRICS, "best epochs", "test days", "s per fit"],
                summary_rows(stored))


if __name__ == "__main__":
    main()
