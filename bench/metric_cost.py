"""Cost of the daily IC and RankIC: ``lit_models.metrics.daily_ic`` against pandas.

The reference is the way qlib evaluates a signal: a frame indexed by (day, node), grouped by
day, ``Series.corr`` (Pearson) and ``Series.corr(method="spearman")`` per group, the mean over
days, and ICIR = mean / std (pandas ``std``, ddof = 1). Both must agree to 1e-9 on every day
and on the four summary numbers; then the wall time of each is compared (alternating repeats:
the best time of each, and the median of the per-repeat speed-ups).

A last row says what bounds the speed: the sorting floor itself, two row-wise argsorts of the
(days, nodes) matrices, which any exact RankIC needs.

Run: ``python bench/metric_cost.py [--days 1000 --nodes 1000 --repeats 9]``.
"""

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import best_of, machine_line, print_table
from lit_models.metrics import daily_ic

MISSING_SHARE = 0.02  # share of node-days whose realised return is unknown
SCORE_DECIMALS = 3  # rounded scores, so that RankIC has ties to average
SIGNAL = 0.05  # weight of the return in the score: a weak but real signal


def synthetic_panel(num_days: int, num_nodes: int, seed: int = 0):
    """Flat (day, score, return) arrays of a panel with a weak signal, ties and gaps.

    Returns:
        ``days``, ``scores``, ``returns``, each of length ``num_days * num_nodes``; about 2 %
        of the returns are NaN and the scores are rounded to 3 decimals (many ties).
    """
    rng = np.random.default_rng(seed)
    size = num_days * num_nodes
    days = np.repeat(np.arange(num_days), num_nodes)
    returns = rng.normal(0.0, 0.02, size)
    scores = np.round(SIGNAL * returns / 0.02 + rng.normal(0.0, 1.0, size), SCORE_DECIMALS)
    returns[rng.random(size) < MISSING_SHARE] = np.nan
    return days, scores, returns


def pandas_frame(days, scores, returns) -> pd.DataFrame:
    """The (day, node)-indexed frame a qlib-style evaluation starts from."""
    nodes = np.arange(len(days)) - np.searchsorted(days, days)  # position within its day
    index = pd.MultiIndex.from_arrays([days, nodes], names=["day", "node"])
    return pd.DataFrame({"score": scores, "label": returns}, index=index)


def pandas_daily_ic(frame: pd.DataFrame) -> dict:
    """IC, RankIC and their ICIRs the pandas way: one ``corr`` per day group."""
    grouped = frame.groupby(level="day")
    daily = grouped.apply(lambda day: day["score"].corr(day["label"]))
    daily_rank = grouped.apply(lambda day: day["score"].corr(day["label"], method="spearman"))
    return {
        "daily_ic": daily.to_numpy(),
        "daily_rank_ic": daily_rank.to_numpy(),
        "ic": daily.mean(),
        "rank_ic": daily_rank.mean(),
        "icir": daily.mean() / daily.std(),
        "rank_icir": daily_rank.mean() / daily_rank.std(),
    }


def sorting_floor(days, scores, returns, num_days: int) -> None:
    """Two row-wise argsorts of the (days, nodes) matrices: what any exact RankIC must pay.

    Missing returns are set to +inf first (NaN slows NumPy's sort).
    """
    np.argsort(scores.reshape(num_days, -1), axis=1)
    np.argsort(np.nan_to_num(returns, nan=np.inf).reshape(num_days, -1), axis=1)


def compare(days, scores, returns) -> dict:
    """Largest absolute differences between ``daily_ic`` and pandas."""
    reference = pandas_daily_ic(pandas_frame(days, scores, returns))
    ours = daily_ic(days, scores, returns)
    summary = max(abs(getattr(ours, key) - reference[key])
                  for key in ("ic", "rank_ic", "icir", "rank_icir"))
    return {
        "daily_ic": float(np.nanmax(np.abs(ours.daily_ic - reference["daily_ic"]))),
        "daily_rank_ic": float(np.nanmax(np.abs(ours.daily_rank_ic
                                                - reference["daily_rank_ic"]))),
        "summary": float(summary),
        "reference": reference,
        "ours": ours,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=9,
                        help="alternating timed calls of each (best and median ratio kept)")
    args = parser.parse_args(argv)

    days, scores, returns = synthetic_panel(args.days, args.nodes)
    frame = pandas_frame(days, scores, returns)
    differences = compare(days, scores, returns)
    ours = differences["ours"]

    timings = {"pandas": [], "ours": [], "floor": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(args.repeats):  # alternate, so that load changes hit all alike
            timings["pandas"].append(best_of(lambda: pandas_daily_ic(frame), 1))
            timings["ours"].append(best_of(lambda: daily_ic(days, scores, returns), 1))
            timings["floor"].append(
                best_of(lambda: sorting_floor(days, scores, returns, args.days), 1))
    best = {name: min(values) for name, values in timings.items()}
    median_ratio = {name: float(np.median(np.array(timings["pandas"]) / np.array(values)))
                    for name, values in timings.items()}  # per alternating repeat
    ours_difference = max(differences[key] for key in ("daily_ic", "daily_rank_ic", "summary"))

    print(machine_line(1))
    print(f"{args.days} days x {args.nodes} nodes, {MISSING_SHARE:.0%} missing returns, scores "
          f"rounded to {SCORE_DECIMALS} decimals; best of {args.repeats} alternating repeats; "
          f"IC {ours.ic:+.5f}, RankIC {ours.rank_ic:+.5f}, ICIR {ours.icir:+.4f}, "
          f"RankICIR {ours.rank_icir:+.4f}, {ours.days_used} days used")
    print()
    print_table(
        ["method", "seconds (IC + RankIC), best", "speed-up vs pandas, best / median",
         "max abs difference vs pandas"],
        [
            ["pandas groupby per day (qlib way)", f"{best['pandas']:.3f}", "1.0x", "-"],
            ["lit_models.metrics.daily_ic", f"{best['ours']:.3f}",
             f"{best['pandas'] / best['ours']:.1f}x / {median_ratio['ours']:.1f}x",
             f"{ours_difference:.1e}"],
            ["floor: two row argsorts, nothing else", f"{best['floor']:.3f}",
             f"{best['pandas'] / best['floor']:.1f}x / {median_ratio['floor']:.1f}x", "-"],
        ],
    )


if __name__ == "__main__":
    main()
