"""Reading market files: both layouts, and a clear error for each kind of bad input."""

import logging

import numpy as np
import pandas as pd
import pytest

from datamodules.loading import DataFormatError, load_groups, load_panel
from datamodules.market_datamodule import MarketDataModule


def _long_table(num_days=5, nodes=("AAA", "BBB")):
    dates = pd.bdate_range("2021-01-04", periods=num_days)
    rows = [{"date": d.strftime("%Y-%m-%d"), "node": n, "close": 10.0 + i + j,
             "volume": 100 + i}
            for i, d in enumerate(dates) for j, n in enumerate(nodes)]
    return pd.DataFrame(rows)


def test_long_table_and_wide_folder_give_the_same_panel(tmp_path, tiny_market):
    wide = load_panel(tiny_market)
    close = pd.read_csv(tiny_market / "close.csv", index_col="date")
    volume = pd.read_csv(tiny_market / "volume.csv", index_col="date")
    long = (close.stack().rename("close").to_frame()
            .join(volume.stack().rename("volume")).reset_index()
            .rename(columns={"level_1": "node"}))
    long.to_parquet(tmp_path / "bars.parquet")
    long.to_csv(tmp_path / "bars.csv", index=False)

    for path in (tmp_path / "bars.parquet", tmp_path / "bars.csv"):
        panel = load_panel(path)
        assert panel.nodes == wide.nodes
        assert panel.dates.equals(wide.dates)
        np.testing.assert_allclose(panel.fields["close"], wide.fields["close"])
        np.testing.assert_allclose(panel.fields["volume"], wide.fields["volume"])


def test_embedded_data_is_the_20_stock_panel():
    panel = load_panel(None)
    assert panel.num_nodes == 20 and panel.num_days == 8313
    assert panel.dates[0] == pd.Timestamp("1990-01-02")
    assert panel.dates[-1] == pd.Timestamp("2022-12-28")
    assert panel.fields["close"][0, panel.nodes.index("AAPL")] == pytest.approx(0.264)


@pytest.mark.parametrize("drop", ["date", "node", "close"])
def test_missing_column_names_file_and_column(tmp_path, drop):
    path = tmp_path / "bars.csv"
    _long_table().drop(columns=[drop]).to_csv(path, index=False)
    with pytest.raises(DataFormatError, match=rf"bars\.csv.*missing column.*'{drop}'"):
        load_panel(path)


def test_unparsable_date_names_row(tmp_path):
    table = _long_table()
    table.loc[3, "date"] = "not-a-date"
    table.to_csv(tmp_path / "bars.csv", index=False)
    with pytest.raises(DataFormatError, match=r"bars\.csv.*'date'.*row 3 \(line 5\).*not-a-date"):
        load_panel(tmp_path / "bars.csv")


def test_duplicate_date_node_names_row(tmp_path):
    table = _long_table()
    table = pd.concat([table, table.iloc[[2]]], ignore_index=True)
    table.to_csv(tmp_path / "bars.csv", index=False)
    last = len(table) - 1
    with pytest.raises(DataFormatError, match=rf"duplicate \(date, node\) at row {last}.*AAA"):
        load_panel(tmp_path / "bars.csv")


@pytest.mark.parametrize("value", [0.0, -3.5])
def test_non_positive_price_names_row(tmp_path, value):
    table = _long_table()
    table.loc[4, "close"] = value
    table.to_csv(tmp_path / "bars.csv", index=False)
    with pytest.raises(DataFormatError,
                       match=rf"column 'close'.*zero or negative price.*row 4.*: {value}\. "):
        load_panel(tmp_path / "bars.csv")


def test_non_positive_price_in_wide_file_names_node_and_date(tiny_market):
    close = pd.read_csv(tiny_market / "close.csv", index_col="date")
    close.iloc[7, 2] = -1.0
    close.to_csv(tiny_market / "close.csv")
    with pytest.raises(DataFormatError, match=rf"close\.csv.*'N02'.*{close.index[7]}: -1\.0\. "):
        load_panel(tiny_market)


def test_non_numeric_value_names_row(tmp_path):
    table = _long_table()
    table["close"] = table["close"].astype(object)
    table.loc[1, "close"] = "12,5"
    table.to_csv(tmp_path / "bars.csv", index=False)
    with pytest.raises(DataFormatError, match=r"'close'.*not a number.*row 1.*12,5"):
        load_panel(tmp_path / "bars.csv")


def test_group_map_with_unknown_node_names_row(tiny_market):
    groups = pd.read_csv(tiny_market / "sectors.csv")
    groups.loc[5, "ticker"] = "ZZZ"
    groups.to_csv(tiny_market / "sectors.csv", index=False)
    panel = load_panel(tiny_market)
    with pytest.raises(DataFormatError, match=r"sectors\.csv.*'ticker'.*'ZZZ'.*row 5"):
        load_groups(tiny_market / "sectors.csv", panel.nodes)


def test_group_map_missing_column_says_which_key_to_set(tiny_market):
    panel = load_panel(tiny_market)
    with pytest.raises(DataFormatError, match=r"no group column 'industry'.*group_group_column"):
        load_groups(tiny_market / "sectors.csv", panel.nodes, group_column="industry")


def test_too_few_days_names_the_need(tmp_path):
    _long_table(num_days=25).to_csv(tmp_path / "bars.csv", index=False)
    data = MarketDataModule(path=str(tmp_path / "bars.csv"), window_sizes=[5, 20])
    with pytest.raises(DataFormatError, match=r"bars\.csv: only 25 trading days.*at least 29"):
        data.setup()


def test_non_finite_bars_are_masked_and_counted_in_one_line(tmp_path, caplog):
    table = _long_table()
    table["close"] = table["close"].astype(float)
    table.loc[0, "close"] = np.inf
    table.loc[1, "close"] = np.nan
    table.to_parquet(tmp_path / "bars.parquet")
    with caplog.at_level(logging.INFO, logger="datamodules.loading"):
        panel = load_panel(tmp_path / "bars.parquet")
    assert np.isnan(panel.fields["close"]).sum() == 2
    lines = [r.getMessage() for r in caplog.records if "masked" in r.getMessage()]
    assert len(lines) == 1 and "'close': 2" in lines[0]


def test_missing_path_says_what_to_pass(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_panel(tmp_path / "nowhere")


def test_group_map_without_known_columns_lists_the_names_tried(tiny_market):
    panel = load_panel(tiny_market)
    pd.DataFrame({"name": panel.nodes, "bucket": "x"}).to_csv(tiny_market / "map.csv",
                                                             index=False)
    with pytest.raises(DataFormatError, match=r"no node column node or ticker or symbol"):
        load_groups(tiny_market / "map.csv", panel.nodes)


@pytest.mark.parametrize("setting, message", [
    ({"batch_size": -3}, r"data\.batch_size must be >= 1, got -3"),
    ({"num_classes": 1}, r"data\.num_classes must be >= 2, got 1"),
    ({"sampler": "bogus"}, r"data\.sampler must be one of .*'bogus'"),
])
def test_bad_settings_name_the_key_and_the_value(setting, message):
    with pytest.raises(ValueError, match=message):
        MarketDataModule(**setting)
