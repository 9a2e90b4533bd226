"""Features without look-ahead, labels per day, splits with gaps."""

import numpy as np
import pandas as pd

from datamodules.features import NO_LABEL, FeatureBuilder, forward_returns, quantile_classes
from datamodules.loading import load_panel
from datamodules.market_datamodule import MarketDataModule


def _builder(panel, window=10, train_days=None):
    builder = FeatureBuilder(panel, window, max_abs_return=0.5, feature_clip=3.0)
    builder.fit_stats(train_days if train_days is not None else np.arange(window, 120))
    return builder


def test_changing_a_future_price_changes_no_earlier_feature(tiny_market):
    panel = load_panel(tiny_market)
    nodes = np.arange(panel.num_nodes)
    train_days = np.arange(10, 100)
    before = _builder(panel, train_days=train_days)
    windows_before = [before.window_features(day, nodes)[0] for day in range(10, 150)]

    changed = load_panel(tiny_market)
    changed.fields["close"][150:, 3] *= 1.7
    changed.fields["volume"][150:, 5] *= 9.0
    after = _builder(changed, train_days=train_days)
    for offset, day in enumerate(range(10, 150)):
        np.testing.assert_array_equal(after.window_features(day, nodes)[0],
                                      windows_before[offset])
    assert not np.array_equal(after.window_features(150, nodes)[0],
                              before.window_features(150, nodes)[0])


def test_normalisation_uses_training_days_only(tiny_market):
    panel = load_panel(tiny_market)
    reference = _builder(panel, train_days=np.arange(10, 100))
    panel.fields["close"][101:, :] *= np.linspace(1, 3, panel.num_days - 101)[:, None]
    shifted = _builder(panel, train_days=np.arange(10, 100))
    np.testing.assert_array_equal(reference.stats.mean, shifted.stats.mean)
    np.testing.assert_array_equal(reference.stats.std, shifted.stats.std)


def test_window_values_are_scale_free_returns_and_relative_prices(tiny_market):
    panel = load_panel(tiny_market)
    builder = _builder(panel)
    values, bar_mask = builder.raw_window(50, np.array([0, 4]))
    close = panel.fields["close"]
    assert values.shape == (2, 10, 3) and bar_mask.all()
    assert builder.feature_names == ["log_return", "close_rel", "volume_log_change"]
    np.testing.assert_allclose(values[1, -1, 0], np.log(close[50, 4] / close[49, 4]))
    np.testing.assert_allclose(values[0, 0, 1], np.log(close[41, 0] / close[50, 0]))
    assert values[0, -1, 1] == 0.0


def test_forward_return_starts_after_the_signal_day():
    close = np.array([[10.0], [11.0], [12.1], [13.31], [20.0]])
    forward = forward_returns(close, horizon=1, max_abs_return=0.5)
    np.testing.assert_allclose(forward[:, 0], [0.1, 0.1, np.nan, np.nan, np.nan])
    forward2 = forward_returns(close, horizon=2, max_abs_return=0.9)
    np.testing.assert_allclose(forward2[:, 0], [0.21, 20.0 / 12.1 - 1, np.nan, np.nan, np.nan])


def test_forward_returns_beyond_the_cap_are_masked():
    close = np.array([[10.0], [10.0], [16.0], [16.0]])
    assert np.isnan(forward_returns(close, horizon=1, max_abs_return=0.5)[0, 0])


def test_quantile_classes_are_cut_per_day_across_nodes():
    forward = np.array([
        [0.05, -0.02, 0.01, 0.03, -0.04],
        [100.0, 200.0, 300.0, 400.0, 500.0],  # another day's scale does not matter
        [0.01, np.nan, 0.01, 0.02, -0.01],
    ])
    classes = quantile_classes(forward, num_classes=5)
    np.testing.assert_array_equal(classes[0], [4, 1, 2, 3, 0])
    np.testing.assert_array_equal(classes[1], [0, 1, 2, 3, 4])
    # 4 valid returns, ties share the average rank 2.5: floor(1.5 * 5 / 4) = 1
    np.testing.assert_array_equal(classes[2], [1, NO_LABEL, 1, 3, 0])


def test_each_day_has_balanced_classes_on_real_data():
    data = MarketDataModule(start_date="2015-01-01")
    data.setup()
    days = data.split_days["train"]
    labels, forward = data.market.labels[days], data.market.forward[days]
    counts = np.stack([(labels == k).sum(axis=1) for k in range(5)], axis=1)
    valid = np.isfinite(forward)
    clean = valid.all(axis=1) & np.array([len(np.unique(day)) == 20 for day in forward])
    assert clean.mean() > 0.95
    assert (counts[clean] == 4).all()  # 20 stocks, 5 classes: 4 per class on a clean day
    np.testing.assert_array_equal(counts.sum(axis=1), valid.sum(axis=1))


def test_splits_are_chronological_with_a_gap_of_horizon_plus_one(tiny_market):
    data = MarketDataModule(path=str(tiny_market), window_sizes=[5, 10], horizon=3)
    data.setup()
    train, val, test = (data.split_days[name] for name in ("train", "val", "test"))
    assert val[0] - train[-1] == 3 + 2 and test[0] - val[-1] == 3 + 2
    # the last training label ends (close of t+1+h) before the first validation day
    assert train[-1] + 1 + 3 < val[0]
    assert train[0] == 10 and test[-1] == data.panel.num_days - 2 - 3


def test_split_by_dates(tiny_market):
    data = MarketDataModule(path=str(tiny_market), window_sizes=[5, 10],
                            val_start="2020-06-01", test_start="2020-08-03")
    data.setup()
    dates = data.panel.dates
    assert dates[data.split_days["val"][0]] == pd.Timestamp("2020-06-01")
    assert dates[data.split_days["test"][0]] == pd.Timestamp("2020-08-03")
