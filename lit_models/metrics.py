"""Daily cross-sectional IC and RankIC, the way the field computes them.

For every day, the Pearson (IC) and Spearman (RankIC) correlation between the scores and the
realised returns of that day's nodes; then the mean over days, each day weighing the same
whatever its size, and the information ratio mean / std over days (ddof = 1, not annualised).

Speed: a (days, nodes) panel is cut into blocks of days small enough for the processor's cache,
and each side of a block is ranked with one row-wise sort of packed integer keys (value and
column in one 64-bit word), so that the sort that any exact RankIC needs is most of the cost.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

MIN_PAIRS = 3
BLOCK_ENTRIES = 1 << 15  # node-days per block: its temporaries stay in cache and are reused
SMALLEST_SQUARE = 2.0 ** -800  # a day's sum of squares below this is computed again, rescaled


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


def _as_array(values, dtype=None) -> np.ndarray:
    """A flat NumPy array of ``values``; torch tensors of any dtype or device are accepted."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.double() if values.is_floating_point() else values
        values = values.numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def _validate(days, scores, returns):
    days = _as_array(days)
    scores, returns = _as_array(scores, np.float64), _as_array(returns, np.float64)
    if not len(days) == len(scores) == len(returns):
        raise ValueError(
            f"days, scores and returns must have one entry per node-day; got lengths "
            f"{len(days)}, {len(scores)} and {len(returns)}.")
    if days.dtype.kind in "fcmMO":  # the kinds that can hold NaN, NaT or None
        missing = np.flatnonzero(pd.isna(days))
        if len(missing):
            raise ValueError(
                f"days has {len(missing)} missing value(s) (NaN, NaT or None), the first at "
                f"index {missing[0]}; give every entry the day it belongs to, or drop it.")
    return days, scores, returns


def _day_matrices(days, scores, returns):
    """One row per day for the scores and for the returns.

    Entries already sorted by day (as evaluation produces them) are used in place; others are
    sorted first. When every day has the same number of entries the flat arrays are reshaped
    without a copy; otherwise short days are padded with NaN, which counts as absent.

    Returns:
        ``day_ids`` (days,), ``score_matrix`` and ``return_matrix`` (days, max_nodes).
    """
    new_day = np.flatnonzero(days[1:] != days[:-1]) + 1  # (day changes,)
    if np.any(days[new_day] < days[new_day - 1]):  # not sorted: sort, then find changes again
        order = np.argsort(days, kind="stable")
        days, scores, returns = days[order], scores[order], returns[order]
        new_day = np.flatnonzero(days[1:] != days[:-1]) + 1

    first_of_day = np.concatenate([[0], new_day]) if len(days) else new_day
    entries_per_day = np.diff(np.r_[first_of_day, len(days)])
    shape = (len(first_of_day), int(entries_per_day.max(initial=1)))
    if len(days) == shape[0] * shape[1]:  # every day the same size
        return days[first_of_day], scores.reshape(shape), returns.reshape(shape)

    day_of_entry = np.repeat(np.arange(shape[0]), entries_per_day)
    column = np.arange(len(days)) - first_of_day[day_of_entry]
    score_matrix, return_matrix = np.full(shape, np.nan), np.full(shape, np.nan)
    score_matrix[day_of_entry, column] = scores
    return_matrix[day_of_entry, column] = returns
    return days[first_of_day], score_matrix, return_matrix


def _block_correlations(scores: np.ndarray, returns: np.ndarray):
    """Pearson and Spearman correlation of each row of a block of days.

    Args:
        scores: one row per day, NaN or infinite where absent.  # (days, nodes)
        returns: same layout.  # (days, nodes)

    Returns:
        ``(ic, rank_ic)``, NaN for a day with fewer than 3 valid pairs or a constant side.
    """
    pair = np.stack([scores, returns])  # (2, days, nodes)
    present = np.isfinite(pair).all(axis=0)  # (days, nodes)
    counts = np.count_nonzero(present, axis=1)  # (days,)

    ranks = _centered_ranks(np.where(present, pair, np.inf).reshape(-1, pair.shape[2]),
                            np.tile(counts, 2)).reshape(pair.shape)  # (2, days, nodes)
    ranks *= present  # absent entries: 0
    rank_ic, _ = _row_pearson(ranks)
    ic = _value_pearson(pair, present, counts)

    # A side is constant exactly when all its centered ranks are 0; its Pearson denominator
    # may still be a rounding error above 0.
    constant = ~ranks.any(axis=2).all(axis=0)
    skipped = constant | (counts < MIN_PAIRS)
    ic[skipped] = np.nan
    rank_ic[skipped] = np.nan
    return ic, rank_ic


def _value_pearson(pair: np.ndarray, present: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Pearson correlation per day of the values themselves (the IC).

    Days whose sums of squares overflow, or fall so low that products lose digits as
    subnormal numbers (|values| beyond about 2**±400), are computed again after scaling each
    side of the day by a power of two: exact, and no change to the correlation.

    Args:
        pair: scores then returns.  # (2, days, nodes)
        present: entries where both sides are finite.  # (days, nodes)
        counts: present entries per day.  # (days,)
    """
    ic, square = _row_pearson(_centered(np.where(present, pair, 0.0), present, counts))

    with np.errstate(invalid="ignore"):
        extreme = ~((square > SMALLEST_SQUARE) & (square < np.inf)).all(axis=0)  # (days,)
    if extreme.any():
        values = np.where(present[extreme], pair[:, extreme], 0.0)  # (2, extreme days, nodes)
        largest = np.maximum(values.max(axis=2), -values.min(axis=2))  # (2, extreme days)
        _, exponent = np.frexp(largest)
        values = np.ldexp(values, -exponent[..., None])  # largest |value| now in [0.5, 1)
        ic[extreme], _ = _row_pearson(_centered(values, present[extreme], counts[extreme]))
    return ic


def _centered(values: np.ndarray, present: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each side of each day minus its mean over the present entries, in place; 0 where absent.

    Args:
        values: both sides, 0 where absent.  # (2, days, nodes)
        present: entries where both sides are finite.  # (days, nodes)
        counts: present entries per day.  # (days,)
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        values -= (np.einsum("sdn->sd", values) / counts)[..., None]
    values *= present
    return values


def _row_pearson(centered: np.ndarray):
    """Pearson correlation per day of the two centered sides (0 where absent).

    Args:
        centered: scores then returns, each minus its daily mean.  # (2, days, nodes)

    Returns:
        ``(correlation, square)``: per day, and each side's sum of squares.  # (days,), (2, days)
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        covariance = np.einsum("dn,dn->d", centered[0], centered[1])
        square = np.einsum("sdn,sdn->sd", centered, centered)  # (2, days)
        correlation = covariance / (np.sqrt(square[0]) * np.sqrt(square[1]))
    return np.clip(correlation, -1.0, 1.0), square


def _ordered_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers that sort like the floats ``values``, with -0.0 and 0.0 equal.

    ``values`` must be a float64 array this function may change (-0.0 becomes 0.0).
    """
    values += 0.0  # turns -0.0 into 0.0
    bits = values.view(np.int64)
    keys = (bits >> 63).view(np.uint64)  # all ones for negatives, else zero
    keys |= np.uint64(1 << 63)
    keys ^= bits.view(np.uint64)  # negatives: every bit flipped; others: the sign bit set
    return keys


def _centered_ranks(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Average ranks of each row's finite entries minus their mean ``(n + 1) / 2``.

    One row-wise sort of packed 64-bit keys gives both the order and the column of every
    entry: the high bits hold the value's order-preserving key, the low bits its column. Two
    different values that agree in all high bits would be taken for a tie; such rows (values
    within about 1e-13 of each other, relatively) are detected and ranked exactly by scipy.

    Args:
        values: finite where present, +inf where absent; changed in place.  # (rows, nodes)
        counts: finite entries per row.  # (rows,)

    Returns:
        Centered ranks in the entries' places; for absent entries, garbage: mask them.
    """
    num_rows, width = values.shape
    column_bits = max((width - 1).bit_length(), 1)
    column_mask = np.uint64((1 << column_bits) - 1)

    packed = _ordered_keys(values)  # (rows, nodes)
    packed &= ~column_mask
    packed |= np.arange(width, dtype=np.uint64)
    packed.sort(axis=1)
    place = (packed & column_mask).view(np.int64)  # column of each entry in sorted order
    place += (np.arange(num_rows) * width)[:, None]  # its flat index
    packed >>= np.uint64(column_bits)  # the value keys alone, still sorted
    repeats = np.zeros(values.shape, dtype=bool)  # key equal to the one before it
    np.equal(packed[:, 1:], packed[:, :-1], out=repeats[:, 1:])
    repeated = np.flatnonzero(repeats)  # flat positions, ascending; never column 0

    centered = np.empty(values.size)
    centered[place.ravel()] = _sorted_centered_ranks(repeated, counts, width).ravel()
    centered = centered.reshape(values.shape)

    _rerank_false_ties(centered, values, place.ravel(), repeated, counts)
    return centered


def _rerank_false_ties(centered, values, place, repeated, counts) -> None:
    """Rank exactly, with scipy, the rows where a tie of high key bits hides different values.

    Only values within about 1e-13 of each other, relatively, can cause this.

    Args:
        centered: the centered ranks to correct in place.  # (rows, nodes)
        values: the ranked values, +inf where absent.  # (rows, nodes)
        place: flat index of each sorted entry.  # (rows * nodes,)
        repeated: sorted positions whose key equals the one before.  # (repeats,)
        counts: finite entries per row.  # (rows,)
    """
    flat_values = values.ravel()
    false_ties = flat_values[place[repeated]] != flat_values[place[repeated - 1]]
    if not false_ties.any():
        return
    for row in np.unique(repeated[false_ties] // values.shape[1]):
        finite = np.isfinite(values[row])
        centered[row, finite] = rankdata(values[row, finite]) - (counts[row] + 1) / 2.0


def _sorted_centered_ranks(repeated: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    """Centered average rank of each position of sorted rows.

    Position ``p`` (0-based) of a row with ``n`` present entries has rank ``p + 1``, centered
    ``p - (n - 1) / 2``, unless it belongs to a run of equal values ``[a, b]``: then every
    entry of the run gets ``(a + b) / 2 - (n - 1) / 2``. Ties are few in real data, so only
    the entries of runs are visited.

    Args:
        repeated: flat positions equal to the position before them, ascending.  # (repeats,)
        counts: present entries per row.  # (rows,)
        width: positions per row.
    """
    centered = np.arange(width) - (counts[:, None] - 1) / 2.0  # (rows, nodes)
    if len(repeated) == 0:
        return centered

    new_run = np.empty(len(repeated), dtype=bool)  # consecutive repeats extend one run
    new_run[0] = True
    np.not_equal(repeated[1:] - repeated[:-1], 1, out=new_run[1:])
    run_of_repeat = np.cumsum(new_run)
    run_of_repeat -= 1
    run_first = repeated[new_run] - 1  # flat position of each run's first entry
    run_last = np.empty_like(run_first)
    run_last[:-1] = repeated[np.flatnonzero(new_run[1:])]  # the repeat before the next run
    run_last[-1] = repeated[-1]
    run_middle = (run_first + run_last) / 2.0  # mean flat position of the run

    flat = centered.reshape(-1)
    flat[repeated] += run_middle[run_of_repeat] - repeated
    flat[run_first] += run_middle - run_first
    return centered


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
        days: day identifier of each entry (numbers, dates or text; none missing).  # (entries,)
        scores: model score of each entry, compared as float64.  # (entries,)
        returns: realised return of each entry, compared as float64.  # (entries,)

    Arrays, lists and torch tensors are accepted; entries need not be sorted by day.

    Raises:
        ValueError: lengths differ, or a day is missing (NaN, NaT or None).

    Example:
        >>> result = daily_ic([0, 0, 0, 0, 0], [1, 1, 1, 1, 2], [5, 4, 3, 2, 1])
        >>> round(result.rank_ic, 4)
        -0.7071
    """
    days, scores, returns = _validate(days, scores, returns)
    day_ids, score_matrix, return_matrix = _day_matrices(days, scores, returns)

    daily = np.empty(len(day_ids))
    daily_rank = np.empty(len(day_ids))
    days_per_block = max(1, BLOCK_ENTRIES // score_matrix.shape[1])
    for first in range(0, len(day_ids), days_per_block):
        block = slice(first, first + days_per_block)
        daily[block], daily_rank[block] = _block_correlations(score_matrix[block],
                                                              return_matrix[block])

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
