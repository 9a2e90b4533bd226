"""Daily cross-sectional IC and RankIC, the way the field computes them.

For every day, the Pearson (IC) and Spearman (RankIC) correlation between the scores and the
realised returns of that day's nodes; then the mean over days, each day weighing the same
whatever its size, and the information ratio mean / std over days (ddof = 1, not annualised).
"""

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

MIN_PAIRS = 3


@dataclass
class DailyIC:
    """IC statistics of one evaluation.

    Attributes:
        ic: mean daily Pearson correlation (NaN when no day counts).
        rank_ic: mean daily Spearman correlation.
        icir: ``mean / std`` of the daily ICs (NaN with fewer than 2 days).
        rank_icir: ``mean / std`` of the daily RankICs.
        days_used: days that entered the means.
        days_skipped: days with fewer than 3 valid pairs or a constant side.
        daily_ic: IC per day, NaN for skipped days.  # (days,)
        daily_rank_ic: RankIC per day.  # (days,)
        day_ids: the day of each entry above.  # (days,)
    """

    ic: float
    rank_ic: float
    icir: float
    rank_icir: float
    days_used: int
    days_skipped: int
    daily_ic: np.ndarray
    daily_rank_ic: np.ndarray
    day_ids: np.ndarray


def _validate(days, scores, returns):
    days, scores, returns = (np.asarray(a).reshape(-1) for a in (days, scores, returns))
    if not len(days) == len(scores) == len(returns):
        raise ValueError(
            f"days, scores and returns must have one entry per node-day; got lengths "
            f"{len(days)}, {len(scores)} and {len(returns)}.")
    return days, scores.astype(np.float64), returns.astype(np.float64)


def _by_day(days, scores, returns):
    """Dense (days, max_nodes) matrices, NaN-padded, keeping only finite pairs."""
    valid = np.isfinite(scores) & np.isfinite(returns)
    day_ids, day_of_entry = np.unique(days, return_inverse=True)
    day_of_entry, scores, returns = day_of_entry[valid], scores[valid], returns[valid]

    order = np.argsort(day_of_entry, kind="stable")
    day_of_entry, scores, returns = day_of_entry[order], scores[order], returns[order]
    counts = np.bincount(day_of_entry, minlength=len(day_ids))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    column = np.arange(len(day_of_entry)) - starts[day_of_entry]

    width = max(int(counts.max(initial=0)), 1)
    score_matrix = np.full((len(day_ids), width), np.nan)  # (days, max_nodes)
    return_matrix = np.full((len(day_ids), width), np.nan)
    score_matrix[day_of_entry, column] = scores
    return_matrix[day_of_entry, column] = returns
    return day_ids, score_matrix, return_matrix, counts


def _row_pearson(left: np.ndarray, right: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pearson correlation per row of NaN-padded matrices; NaN for < 3 pairs or no spread."""
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows of empty days
        constant = ((np.nanmax(left, axis=1) == np.nanmin(left, axis=1))
                    | (np.nanmax(right, axis=1) == np.nanmin(right, axis=1)))
        left = left - np.nanmean(left, axis=1, keepdims=True)
        right = right - np.nanmean(right, axis=1, keepdims=True)
        covariance = np.nansum(left * right, axis=1)
        scale = np.sqrt(np.nansum(left ** 2, axis=1) * np.nansum(right ** 2, axis=1))
        correlation = covariance / scale
    flat = constant | ~(scale > 0) | (counts < MIN_PAIRS)
    correlation[flat] = np.nan
    return np.clip(correlation, -1.0, 1.0)


def _information_ratio(daily: np.ndarray) -> float:
    kept = daily[np.isfinite(daily)]
    if len(kept) < 2:
        return float("nan")
    spread = kept.std(ddof=1)
    return float(kept.mean() / spread) if spread > 0 else float("nan")


def daily_ic(days, scores, returns) -> DailyIC:
    """Mean daily IC and RankIC of ``scores`` against realised ``returns``.

    For each day ``d`` with valid pairs ``(s_i, r_i)``, ``i = 1..n_d`` (a pair is dropped when
    either side is NaN or infinite):

    * ``IC_d = Σ (s_i − s̄)(r_i − r̄) / sqrt(Σ (s_i − s̄)² · Σ (r_i − r̄)²)`` (Pearson);
    * ``RankIC_d`` = the same formula on the average ranks of ``s`` and ``r`` (Spearman; tied
      values share the mean of their ranks).

    A day with ``n_d < 3`` or a constant side gives no correlation: it is skipped and counted.
    Then ``IC = mean_d IC_d``, ``ICIR = mean_d IC_d / std_d IC_d`` (ddof = 1), and likewise
    for RankIC.

    Args:
        days: day identifier of each entry.  # (entries,)
        scores: model score of each entry.  # (entries,)
        returns: realised return of each entry.  # (entries,)

    Example:
        >>> result = daily_ic([0, 0, 0, 0, 0], [1, 1, 1, 1, 2], [5, 4, 3, 2, 1])
        >>> round(result.rank_ic, 4)
        -0.7071
    """
    days, scores, returns = _validate(days, scores, returns)
    day_ids, score_matrix, return_matrix, counts = _by_day(days, scores, returns)

    daily = _row_pearson(score_matrix, return_matrix, counts)
    with np.errstate(invalid="ignore"):
        score_ranks = rankdata(score_matrix, axis=1, nan_policy="omit")
        return_ranks = rankdata(return_matrix, axis=1, nan_policy="omit")
    daily_rank = _row_pearson(score_ranks, return_ranks, counts)

    counted = np.isfinite(daily) & np.isfinite(daily_rank)
    daily[~counted] = np.nan
    daily_rank[~counted] = np.nan
    used = int(counted.sum())
    return DailyIC(
        ic=float(daily[counted].mean()) if used else float("nan"),
        rank_ic=float(daily_rank[counted].mean()) if used else float("nan"),
        icir=_information_ratio(daily),
        rank_icir=_information_ratio(daily_rank),
        days_used=used,
        days_skipped=len(day_ids) - used,
        daily_ic=daily,
        daily_rank_ic=daily_rank,
        day_ids=day_ids,
    )
