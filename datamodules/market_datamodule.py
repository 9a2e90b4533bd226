"""LightningDataModule: market data files -> day samples for training, validation, test, predict."""

import logging
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from datamodules import graph as graphs
from datamodules.datasets import (
    FullDayDataset,
    PooledDataset,
    PreparedMarket,
    SampledDayDataset,
    collate_days,
)
from datamodules.features import FeatureBuilder, forward_returns, quantile_classes
from datamodules.loading import (
    DataFormatError,
    MarketPanel,
    load_adjacency,
    load_groups,
    load_panel,
)
from datamodules.samplers import SAMPLERS, EpochShuffleSampler

log = logging.getLogger(__name__)

GRAPHS = ("group", "correlation", "adjacency", "none")
PREDICT_SPLITS = ("val", "test", "all")
GROUP_FILE_NAMES = ("sectors.csv", "industry.csv", "groups.csv")


class MarketDataModule(L.LightningDataModule):
    """Daily bars of a universe of nodes, split by date, served one day per sample.

    Args:
        path: long table file or folder of wide matrices; ``None`` uses the embedded 20 S&P 500
            stocks shipped with the project.
        group_file: CSV mapping nodes to groups. ``"auto"`` looks for sectors.csv,
            industry.csv or groups.csv beside the data; ``None`` uses no group map.
        group_node_column: node column of the group map (default: node, ticker or symbol).
        group_column: group column of the group map (default: group, sector or industry).
        adjacency_file: square CSV adjacency matrix, used when ``graph='adjacency'``.
        graph: ``group`` (same group), ``correlation`` (top-k correlation of training-period
            returns), ``adjacency`` (from ``adjacency_file``) or ``none`` (self-loops only).
        correlation_top_k: neighbours per node for ``graph='correlation'``.
        window_sizes: lookback windows in trading days, one encoder scale each.
        horizon: label horizon in trading days, from the close of t+1.
        num_classes: quantile classes per day.
        max_abs_return: daily or forward moves beyond this (absolute, simple return) are masked.
        feature_clip: normalised features are clipped to +- this many standard deviations.
        start_date: first calendar date kept (YYYY-MM-DD), or None.
        end_date: last calendar date kept, or None.
        val_start: first validation signal day; None splits by ``split_fractions``.
        test_start: first test signal day; None splits by ``split_fractions``.
        split_fractions: train, val and test shares of the labelled days.
        cross_sectional: one sample per day (True) or pooled (node, day) samples (False).
        batch_size: days per batch in cross-sectional mode.
        pooled_batch_size: (node, day) samples per batch in pooled mode.
        num_center_nodes: centers drawn per training sample.
        sampler: ``degree``, ``uniform`` or ``sequential`` center sampling.
        sampler_temperature: temperature of softmax(degree / T) for ``sampler='degree'``.
        samples_per_day: training samples drawn per day.
        num_workers: DataLoader worker processes.
        seed: seed of the training order and of every center draw.
        predict_split: days that ``predict`` scores: ``val``, ``test`` or ``all`` (every day
            with a full window, including the latest days that have no label yet).
    """

    def __init__(
        self,
        path: Optional[str] = None,
        group_file: Optional[str] = "auto",
        group_node_column: Optional[str] = None,
        group_column: Optional[str] = None,
        adjacency_file: Optional[str] = None,
        graph: str = "group",
        correlation_top_k: int = 10,
        window_sizes: list[int] = [20, 40, 80],
        horizon: int = 1,
        num_classes: int = 5,
        max_abs_return: float = 0.5,
        feature_clip: float = 3.0,
        start_date: Optional[str] = None,
        end_date: Optional[str] = None,
        val_start: Optional[str] = None,
        test_start: Optional[str] = None,
        split_fractions: list[float] = [0.7, 0.15, 0.15],
        cross_sectional: bool = True,
        batch_size: int = 4,
        pooled_batch_size: int = 512,
        num_center_nodes: int = 8,
        sampler: str = "degree",
        sampler_temperature: float = 20.0,
        samples_per_day: int = 1,
        num_workers: int = 0,
        seed: int = 42,
        predict_split: str = "test",
    ):
        super().__init__()
        _check_choice("graph", graph, GRAPHS)
        _check_choice("sampler", sampler, SAMPLERS)
        _check_choice("predict_split", predict_split, PREDICT_SPLITS)
        if not window_sizes or min(window_sizes) < 2:
            raise ValueError(
                f"data.window_sizes must be a list of lengths >= 2, got {window_sizes}.")
        if len(split_fractions) != 3 or min(split_fractions) <= 0:
            raise ValueError(
                f"data.split_fractions must be three positive shares, got {split_fractions}.")
        for name, value in (("num_center_nodes", num_center_nodes), ("batch_size", batch_size),
                            ("pooled_batch_size", pooled_batch_size),
                            ("samples_per_day", samples_per_day), ("horizon", horizon)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}.")
        if num_classes < 2:
            raise ValueError(f"data.num_classes must be >= 2, got {num_classes}.")
        self.save_hyperparameters()
        self.market: Optional[PreparedMarket] = None
        self.panel: Optional[MarketPanel] = None
        self.split_days: dict = {}

    # -- facts the model needs before training (linked by the CLI) -------------------------

    @property
    def num_nodes(self) -> int:
        return self._prepared().num_nodes

    @property
    def num_features(self) -> int:
        return self._prepared().builder.num_features

    @property
    def nodes(self) -> list:
        self._prepared()
        return self.panel.nodes

    @property
    def dates(self) -> pd.DatetimeIndex:
        self._prepared()
        return self.panel.dates

    # -- Lightning hooks -------------------------------------------------------------------

    def setup(self, stage: Optional[str] = None) -> None:
        self._prepared()

    def train_dataloader(self) -> DataLoader:
        market, hp = self._prepared(), self.hparams
        days = self.split_days["train"]
        if hp.cross_sectional:
            dataset = SampledDayDataset(market, days, hp.num_center_nodes, hp.sampler,
                                        hp.sampler_temperature, hp.samples_per_day, hp.seed)
            return self._loader(dataset, hp.batch_size, collate_days, shuffle=True)
        dataset = PooledDataset(market, days, labelled_only=True)
        return self._loader(dataset, hp.pooled_batch_size, None, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.split_days["val"], labelled_only=True)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.split_days["test"], labelled_only=True)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.split_days[f"predict_{self.hparams.predict_split}"],
                                 labelled_only=False)

    # -- helpers ---------------------------------------------------------------------------

    def _loader(self, dataset, batch_size: int, collate_fn, shuffle: bool) -> DataLoader:
        sampler = EpochShuffleSampler(len(dataset), self.hparams.seed, shuffle=shuffle)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                          collate_fn=collate_fn, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def _eval_loader(self, days: np.ndarray, labelled_only: bool) -> DataLoader:
        market, hp = self._prepared(), self.hparams
        if hp.cross_sectional:
            return DataLoader(FullDayDataset(market, days), batch_size=hp.batch_size,
                              collate_fn=collate_days, num_workers=hp.num_workers)
        return DataLoader(PooledDataset(market, days, labelled_only), num_workers=hp.num_workers,
                          batch_size=hp.pooled_batch_size)

    def _prepared(self) -> PreparedMarket:
        if self.market is None:
            self._prepare()
        return self.market

    def _prepare(self) -> None:
        hp = self.hparams
        panel = _restrict_dates(load_panel(hp.path), hp.start_date, hp.end_date)
        window = max(hp.window_sizes)
        self.split_days = _split_days(panel, window, hp.horizon, hp.split_fractions,
                                      hp.val_start, hp.test_start)

        builder = FeatureBuilder(panel, window, hp.max_abs_return, hp.feature_clip)
        builder.fit_stats(self.split_days["train"], seed=hp.seed)
        forward = forward_returns(panel.fields["close"], hp.horizon, hp.max_abs_return)
        labels = quantile_classes(forward, hp.num_classes)

        adjacency = self._adjacency(panel, builder)
        log.info("Graph (%s): %s", hp.graph, graphs.describe(adjacency))
        self.panel = panel
        self.market = PreparedMarket(
            builder=builder,
            labels=labels,
            forward=forward,
            edge_index=graphs.edges_with_self_loops(adjacency),
            neighbours=[np.flatnonzero(row) for row in adjacency],
            degree=adjacency.sum(axis=1),
        )

    def _adjacency(self, panel: MarketPanel, builder: FeatureBuilder) -> np.ndarray:
        hp = self.hparams
        if hp.graph == "adjacency":
            if hp.adjacency_file is None:
                raise ValueError("graph='adjacency' needs data.adjacency_file.")
            return load_adjacency(hp.adjacency_file, panel.nodes)
        if hp.graph == "correlation":
            train = self.split_days["train"]
            # Returns up to the last training day only: a graph from later dates looks ahead.
            returns = builder.log_return[: train[-1] + 1]
            return graphs.correlation_adjacency(returns, hp.correlation_top_k)
        if hp.graph == "group":
            group_file = self._group_file(panel)
            if group_file is not None:
                groups = load_groups(group_file, panel.nodes, hp.group_node_column,
                                     hp.group_column)
                return graphs.group_adjacency(groups)
            log.warning("No group map found for %s: the graph has self-loops only. Set "
                        "data.group_file or data.graph.", panel.source)
        return np.zeros((panel.num_nodes, panel.num_nodes), dtype=bool)

    def _group_file(self, panel: MarketPanel) -> Optional[Path]:
        group_file = self.hparams.group_file
        if group_file is None:
            return None
        if group_file != "auto":
            return Path(group_file)
        source = Path(panel.source)
        folder = source if source.is_dir() else source.parent
        for name in GROUP_FILE_NAMES:
            if (folder / name).is_file():
                return folder / name
        return None


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"data.{name} must be one of {list(choices)}, got {value!r}.")


def _restrict_dates(panel: MarketPanel, start_date, end_date) -> MarketPanel:
    keep = np.ones(panel.num_days, dtype=bool)
    if start_date is not None:
        keep &= panel.dates >= pd.Timestamp(start_date)
    if end_date is not None:
        keep &= panel.dates <= pd.Timestamp(end_date)
    if keep.all():
        return panel
    fields = {name: matrix[keep] for name, matrix in panel.fields.items()}
    return MarketPanel(panel.dates[keep], panel.nodes, fields, panel.source)


def _split_days(panel: MarketPanel, window: int, horizon: int, fractions, val_start,
                test_start) -> dict:
    """Signal days of each part, chronological, with a gap between parts.

    The first usable day has a full window behind it (and the return into its first bar); the
    last labelled day has a close ``horizon`` days after the next day. Between two parts
    ``horizon + 1`` days are dropped, so the last label of a part ends before the first
    signal day of the next: no label crosses a boundary.
    """
    first, last_labelled = window, panel.num_days - 2 - horizon
    gap = horizon + 1
    needed = window + horizon + 1 + 2 * gap + 3
    if panel.num_days < needed:
        raise DataFormatError(
            f"{panel.source}: only {panel.num_days} trading days after date filtering; the "
            f"longest window ({window}) plus the horizon ({horizon}), the gaps between splits "
            f"and one day per split need at least {needed}. Use more data or smaller "
            f"data.window_sizes."
        )

    labelled = np.arange(first, last_labelled + 1)
    if val_start is None or test_start is None:
        shares = np.cumsum(fractions) / np.sum(fractions)
        val_first = labelled[int(round(shares[0] * len(labelled)))]
        test_first = labelled[min(int(round(shares[1] * len(labelled))), len(labelled) - 1)]
    if val_start is not None:
        val_first = int(panel.dates.searchsorted(pd.Timestamp(val_start)))
    if test_start is not None:
        test_first = int(panel.dates.searchsorted(pd.Timestamp(test_start)))

    days = {
        "train": np.arange(first, val_first - gap),
        "val": np.arange(val_first, test_first - gap),
        "test": np.arange(test_first, last_labelled + 1),
    }
    days["predict_val"], days["predict_test"] = days["val"], days["test"]
    days["predict_all"] = np.arange(first, panel.num_days)
    for name in ("train", "val", "test"):
        if len(days[name]) == 0:
            raise DataFormatError(
                f"{panel.source}: the {name} split is empty (val starts "
                f"{panel.dates[min(val_first, panel.num_days - 1)].date()}, test starts "
                f"{panel.dates[min(test_first, panel.num_days - 1)].date()}). Adjust "
                f"data.val_start, data.test_start or data.split_fractions."
            )
    log.info("Split (signal days): train %s..%s (%d), val %s..%s (%d), test %s..%s (%d); "
             "label horizon %d day(s) from the close of t+1",
             *_span(panel, days["train"]), *_span(panel, days["val"]),
             *_span(panel, days["test"]), horizon)
    return days


def _span(panel: MarketPanel, days: np.ndarray):
    return panel.dates[days[0]].date(), panel.dates[days[-1]].date(), len(days)
