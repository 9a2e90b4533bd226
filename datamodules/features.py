"""Per-node, per-day inputs and labels built from a :class:`MarketPanel` without look-ahead.

For a signal day ``t`` (decided after the close of ``t``):

* features use bars of days ``t - window + 1 .. t`` only: the daily log return, the log of
  each price relative to the close of ``t`` and, when volume exists, the daily change of
  ``log(1 + volume)`` (likewise ``amount``); a bar mask marks days a node had no bar;
* the label is the forward return ``close[t + 1 + horizon] / close[t + 1] - 1``: a signal made
  after the close of ``t`` trades at ``t + 1``. It is cut into ``num_classes`` quantile classes
  per day, across that day's nodes, and kept raw for IC.

Daily moves above ``max_abs_return`` in absolute value are treated as data errors (unadjusted
spin-offs, split glitches) and masked, in features and labels alike.
"""

import logging
from dataclasses import dataclass

import numpy as np

from datamodules.loading import MarketPanel

log = logging.getLogger(__name__)

NO_LABEL = -1


@dataclass
class FeatureStats:
    """Normalisation statistics per (lag, feature), computed on training days only."""

    mean: np.ndarray  # (window, features)
    std: np.ndarray  # (window, features)


class FeatureBuilder:
    """Builds the window of normalised features of any set of nodes on any signal day.

    Base quantities are precomputed once per panel as (days, nodes) matrices; a window is
    sliced and normalised on demand, so memory stays that of the panel whatever the window.
    """

    def __init__(self, panel: MarketPanel, window: int, max_abs_return: float,
                 feature_clip: float):
        self.window = window
        self.feature_clip = feature_clip
        self.close = panel.fields["close"]  # (days, nodes)
        self.log_return = _masked_log_change(self.close, max_abs_return)  # (days, nodes)
        self.price_fields = [f for f in ("open", "high", "low") if f in panel.fields]
        self.prices = [panel.fields[f] for f in self.price_fields]
        self.flow_fields = [f for f in ("volume", "amount") if f in panel.fields]
        self.flows = [_masked_log_change(np.log1p(panel.fields[f]), None, already_log=True)
                      for f in self.flow_fields]
        self.feature_names = (["log_return", "close_rel"]
                              + [f"{f}_rel" for f in self.price_fields]
                              + [f"{f}_log_change" for f in self.flow_fields])
        self.stats = None

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    def raw_window(self, day: int, nodes: np.ndarray):
        """Un-normalised window ending at ``day`` (inclusive).

        Returns:
            values (NaN where missing)  # (nodes, window, features)
            bar_mask, True where the node had a close that day  # (nodes, window)
        """
        days = slice(day - self.window + 1, day + 1)
        close_window = self.close[days][:, nodes]  # (window, nodes)
        last_close = self.close[day, nodes]  # (nodes,)
        with np.errstate(divide="ignore", invalid="ignore"):
            channels = [self.log_return[days][:, nodes], np.log(close_window / last_close)]
            channels += [np.log(price[days][:, nodes] / last_close) for price in self.prices]
        channels += [flow[days][:, nodes] for flow in self.flows]
        values = np.stack(channels, axis=-1).transpose(1, 0, 2)  # (nodes, window, features)
        bar_mask = np.isfinite(close_window).T  # (nodes, window)
        return values, bar_mask

    def fit_stats(self, days: np.ndarray, max_days: int = 256, seed: int = 0) -> None:
        """Mean and std per (lag, feature) over windows of (a sample of) training days."""
        rng = np.random.default_rng(seed)
        if len(days) > max_days:
            days = np.sort(rng.choice(days, size=max_days, replace=False))
        all_nodes = np.arange(self.close.shape[1])
        total = np.zeros((self.window, self.num_features))
        total_sq = np.zeros_like(total)
        count = np.zeros_like(total)
        for day in days:
            values = self.raw_window(day, all_nodes)[0]  # (nodes, window, features)
            finite = np.isfinite(values)
            values = np.where(finite, values, 0.0)
            total += values.sum(axis=0)
            total_sq += (values ** 2).sum(axis=0)
            count += finite.sum(axis=0)
        count = np.maximum(count, 1)
        mean = total / count  # (window, features)
        std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
        # A lag with no spread (the last close relative to itself is always 0) keeps scale 1.
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        self.stats = FeatureStats(mean, std)

    def window_features(self, day: int, nodes: np.ndarray):
        """Normalised window: z-score per (lag, feature), clipped, missing values set to 0.

        Returns:
            features  # (nodes, window, features) float32
            bar_mask  # (nodes, window) bool
            has_input, True where the node has a close on ``day``  # (nodes,) bool
        """
        if self.stats is None:
            raise RuntimeError("fit_stats() must run on training days before windows are built.")
        values, bar_mask = self.raw_window(day, nodes)
        normalised = (values - self.stats.mean) / self.stats.std
        normalised = np.clip(normalised, -self.feature_clip, self.feature_clip)
        normalised = np.nan_to_num(normalised, nan=0.0).astype(np.float32)
        return normalised, bar_mask, bar_mask[:, -1].copy()


def _masked_log_change(series: np.ndarray, max_abs_return, already_log: bool = False):
    """Day-over-day log change, NaN for the first day, gaps and (for prices) moves that
    exceed ``max_abs_return`` as a simple return."""
    change = np.full_like(series, np.nan)
    if already_log:
        change[1:] = series[1:] - series[:-1]
        return change
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = series[1:] / series[:-1]
        change[1:] = np.log(ratio)
        if max_abs_return is not None:
            change[1:][np.abs(ratio - 1.0) > max_abs_return] = np.nan
    return change


def forward_returns(close: np.ndarray, horizon: int, max_abs_return: float) -> np.ndarray:
    """Return from the close of ``t + 1`` to the close of ``t + 1 + horizon``, per signal day.

    Returns:
        NaN where a close is missing, beyond the data, or the move exceeds
        ``max_abs_return``.  # (days, nodes)
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1 trading day, got {horizon}.")
    num_days = close.shape[0]
    forward = np.full_like(close, np.nan)
    last_signal_day = num_days - 2 - horizon
    if last_signal_day >= 0:
        entry = close[1: last_signal_day + 2]
        exit_ = close[1 + horizon: last_signal_day + 2 + horizon]
        with np.errstate(divide="ignore", invalid="ignore"):
            forward[: last_signal_day + 1] = exit_ / entry - 1.0
    forward[np.abs(forward) > max_abs_return] = np.nan
    return forward


def quantile_classes(forward: np.ndarray, num_classes: int) -> np.ndarray:
    """Cut each day's forward returns into ``num_classes`` quantile classes across nodes.

    Class ``k`` holds the nodes whose average rank ``r`` (1-based, ties averaged) among the
    day's ``n`` valid returns satisfies ``k = floor((r - 1) * num_classes / n)``: class 0 the
    lowest returns, ``num_classes - 1`` the highest. Missing returns get ``NO_LABEL``.

    Args:
        forward: forward returns, NaN where missing.  # (days, nodes)
        num_classes: number of classes, >= 2.

    Returns:
        int64 classes.  # (days, nodes)
    """
    from scipy.stats import rankdata

    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    valid = np.isfinite(forward)
    ranks = rankdata(np.where(valid, forward, np.nan), axis=1, nan_policy="omit")
    counts = valid.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        classes = np.floor((ranks - 1.0) * num_classes / counts)
    classes = np.where(valid, np.clip(classes, 0, num_classes - 1), NO_LABEL)
    return classes.astype(np.int64)
