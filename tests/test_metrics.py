"""Daily IC and RankIC against a pandas group-by-day reference (the way qlib computes them)."""

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from lit_models import metrics
from lit_models.metrics import daily_ic


def _pandas_reference(days, scores, returns):
    frame = pd.DataFrame({"day": days, "score": scores, "ret": returns})
    frame = frame[np.isfinite(frame.score) & np.isfinite(frame.ret)]
    grouped = frame.groupby("day")
    ic = grouped.apply(lambda g: g.score.corr(g.ret) if len(g) >= 3 else np.nan,
                       include_groups=False)
    rank_ic = grouped.apply(
        lambda g: g.score.corr(g.ret, method="spearman") if len(g) >= 3 else np.nan,
        include_groups=False)
    return ic.dropna(), rank_ic.dropna()


def _check_against_pandas(days, scores, returns):
    result = daily_ic(days, scores, returns)
    ic, rank_ic = _pandas_reference(days, scores, returns)
    assert result.days_used == len(ic) == len(rank_ic)
    assert result.ic == pytest.approx(ic.mean(), abs=1e-12, nan_ok=True)
    assert result.rank_ic == pytest.approx(rank_ic.mean(), abs=1e-12, nan_ok=True)
    assert result.icir == pytest.approx(ic.mean() / ic.std(ddof=1), abs=1e-10, nan_ok=True)
    assert result.rank_icir == pytest.approx(rank_ic.mean() / rank_ic.std(ddof=1), abs=1e-10,
                                              nan_ok=True)
    return result


def test_random_days_of_different_sizes():
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 60, size=40)
    days = np.repeat(np.arange(40), sizes)
    returns = rng.normal(size=len(days))
    scores = 0.3 * returns + rng.normal(size=len(days))
    result = _check_against_pandas(days, scores, returns)
    assert result.days_skipped == 0 and result.ic > 0.1


def test_tie_heavy_inputs():
    rng = np.random.default_rng(1)
    days = np.repeat(np.arange(30), 25)
    scores = rng.integers(0, 4, size=len(days)).astype(float)
    returns = rng.integers(-2, 3, size=len(days)).astype(float)
    _check_against_pandas(days, scores, returns)


def test_nan_and_inf_pairs_are_dropped():
    rng = np.random.default_rng(2)
    days = np.repeat(np.arange(20), 15)
    scores, returns = rng.normal(size=(2, len(days)))
    scores[rng.random(len(days)) < 0.1] = np.nan
    returns[rng.random(len(days)) < 0.1] = np.nan
    returns[5] = np.inf
    _check_against_pandas(days, scores, returns)


def test_constant_and_small_days_are_skipped_and_counted():
    days = np.array([0] * 5 + [1] * 5 + [2] * 2 + [3] * 4)
    scores = np.array([1, 2, 3, 4, 5, 7, 7, 7, 7, 7, 1, 2, 0.1, 0.4, 0.2, 0.3])
    returns = np.array([2, 1, 4, 3, 5, 1, 2, 3, 4, 5, 1, 2, 1.0, 1.0, 1.0, 1.0])
    result = daily_ic(days, scores, returns)
    assert result.days_used == 1 and result.days_skipped == 3
    assert result.ic == pytest.approx(0.8)
    assert result.rank_ic == pytest.approx(0.8)
    assert np.isnan(result.icir)  # one day: no spread to divide by
    np.testing.assert_array_equal(np.isnan(result.daily_ic), [False, True, True, True])


def test_documented_tie_example():
    result = daily_ic([0] * 5, [1, 1, 1, 1, 2], [5, 4, 3, 2, 1])
    assert result.rank_ic == pytest.approx(-0.7071, abs=1e-4)


def test_days_weigh_equally_whatever_their_size():
    rng = np.random.default_rng(3)
    big = rng.normal(size=500)
    days = np.array([0] * 500 + [1] * 4)
    scores = np.concatenate([big, [1, 2, 3, 4]])
    returns = np.concatenate([big, [4, 3, 2, 1]])
    result = daily_ic(days, scores, returns)
    assert result.ic == pytest.approx(0.0, abs=1e-12)  # (+1 + -1) / 2


def test_mismatched_lengths_name_the_lengths():
    with pytest.raises(ValueError, match="got lengths 3, 2 and 3"):
        daily_ic([0, 0, 0], [1, 2], [1, 2, 3])


def test_days_split_over_many_blocks(monkeypatch):
    monkeypatch.setattr(metrics, "BLOCK_ENTRIES", 64)  # three 20-node days per block
    rng = np.random.default_rng(4)
    days = np.repeat(np.arange(25), 20)
    returns = rng.normal(size=len(days))
    scores = np.round(0.5 * returns + rng.normal(size=len(days)), 1)  # ties
    returns[rng.random(len(days)) < 0.05] = np.nan
    _check_against_pandas(days, scores, returns)


def test_unsorted_days_wide_days_and_text_day_ids():
    rng = np.random.default_rng(5)
    days = np.repeat(np.array(["2024-01-02", "2024-01-03", "2024-01-04"]), 1500)
    scores, returns = rng.normal(size=(2, len(days)))
    shuffle = rng.permutation(len(days))
    result = _check_against_pandas(days[shuffle], scores[shuffle], returns[shuffle])
    assert list(result.day_ids) == ["2024-01-02", "2024-01-03", "2024-01-04"]


def test_values_a_rounding_error_apart_are_not_tied():
    # 1.0 and the next float up differ only in bits that the packed sort key drops.
    tiny_steps = np.nextafter(1.0, 2.0) - 1.0
    scores = np.array([1.0, 1.0 + tiny_steps, 1.0 + 2 * tiny_steps, 0.5, 2.0, 1.0])
    returns = np.array([1.0, 2.0, 3.0, 0.0, 4.0, 1.5])
    result = _check_against_pandas(np.zeros(6), scores, returns)
    expected = spearmanr(scores, returns).statistic
    assert result.rank_ic == pytest.approx(expected, abs=1e-12)
    assert result.rank_ic != pytest.approx(daily_ic(np.zeros(6), np.round(scores, 6),
                                                    returns).rank_ic, abs=1e-3)


def test_negative_zero_ties_with_zero():
    scores = np.array([-0.0, 0.0, 1.0, 2.0, -1.0])
    returns = np.array([1.0, 2.0, 3.0, 4.0, 0.0])
    result = daily_ic(np.zeros(5), scores, returns)
    assert result.rank_ic == pytest.approx(spearmanr(scores, returns).statistic, abs=1e-12)


def test_no_entries_gives_no_days():
    result = daily_ic([], [], [])
    assert result.days_used == 0 and result.days_skipped == 0
    assert np.isnan(result.ic) and np.isnan(result.rank_icir)


@pytest.mark.parametrize("nodes", [1, 2, 3, 4, 1024, 1025])
def test_day_widths_around_the_packed_key_boundaries(nodes):
    rng = np.random.default_rng(nodes)
    days = np.repeat(np.arange(4), nodes)
    scores = rng.integers(-3, 4, size=len(days)) * rng.choice([1.0, -0.0, np.nan], len(days),
                                                                p=[0.8, 0.1, 0.1])
    returns = rng.normal(size=len(days))
    result = _check_against_pandas(days, scores, returns)
    assert result.days_used + result.days_skipped == 4


def _exact_pearson(scores, returns) -> float:
    """Pearson correlation in rational arithmetic: no overflow, no underflow, no rounding."""
    scores, returns = [Fraction(float(v)) for v in scores], [Fraction(float(v)) for v in returns]
    score_mean, return_mean = sum(scores) / len(scores), sum(returns) / len(returns)
    covariance = sum((s - score_mean) * (r - return_mean) for s, r in zip(scores, returns))
    score_square = sum((s - score_mean) ** 2 for s in scores)
    return_square = sum((r - return_mean) ** 2 for r in returns)
    return math.copysign(math.sqrt(covariance ** 2 / (score_square * return_square)),
                         1.0 if covariance > 0 else -1.0)


@pytest.mark.parametrize("score_scale, return_scale", [
    (1e80, 1e80), (1e155, 1e155), (1e300, 1e-300), (1e-100, 1e-100), (1e-170, 1.0),
    (5e-324, 1.0),  # subnormal scores: multiples of the smallest float
])
def test_extreme_magnitudes_neither_overflow_nor_underflow(score_scale, return_scale):
    rng = np.random.default_rng(6)
    scores = rng.integers(-50, 50, size=40) * score_scale
    returns = rng.normal(size=40) * return_scale
    result = daily_ic(np.zeros(40), scores, returns)
    assert result.days_used == 1
    assert result.ic == pytest.approx(_exact_pearson(scores, returns), abs=1e-12)
    assert result.rank_ic == pytest.approx(spearmanr(scores, returns).statistic, abs=1e-12)


def test_largest_floats_do_not_overflow_the_mean():
    largest = np.finfo(np.float64).max
    scores = np.array([largest, -largest, 0.0, 1.0, largest])
    returns = np.arange(5.0)
    assert daily_ic(np.zeros(5), scores, returns).ic == pytest.approx(
        _exact_pearson(scores, returns), abs=1e-12)


@pytest.mark.parametrize("days", [[1.0, 1.0, np.nan, 1.0],
                                  np.array(["2024-01-02"] * 2 + ["NaT"] * 2, "datetime64[D]"),
                                  ["a", "a", None, "a"]])
def test_missing_day_ids_are_refused_with_their_position(days):
    with pytest.raises(ValueError, match="days has .* missing value.*index 2"):
        daily_ic(days, [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])


def test_torch_tensors_with_grad_and_bfloat16_are_accepted():
    scores = torch.tensor([1.0, 3.0, 2.0, 4.0], requires_grad=True)
    returns = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    result = daily_ic(torch.zeros(4, dtype=torch.int64), scores, returns)
    assert result.ic == pytest.approx(0.8)
    assert result.rank_ic == pytest.approx(0.8)
