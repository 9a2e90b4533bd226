"""Shared fixtures: a tiny deterministic market and the arguments of a fast CPU fit."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# Two cores: one torch thread per test process keeps fits fast and their results repeatable,
# set at import so that module- and session-scoped fixtures run single-threaded too.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SECTORS = ["Tech", "Tech", "Tech", "Energy", "Energy", "Energy",
           "Health", "Health", "Health", "Banks", "Banks", "n/a"]


def write_tiny_market(folder: Path, num_days: int = 220, seed: int = 0) -> Path:
    """A wide-matrix folder (close, volume, sectors.csv) of 12 nodes with a weak signal:
    yesterday's return partly reverses, so a model can beat chance."""
    rng = np.random.default_rng(seed)
    num_nodes = len(SECTORS)
    dates = pd.bdate_range("2020-01-01", periods=num_days)
    nodes = [f"N{i:02d}" for i in range(num_nodes)]
    returns = rng.normal(0.0, 0.01, size=(num_days, num_nodes))
    returns[1:] -= 0.3 * returns[:-1]
    close = 100.0 * np.exp(np.cumsum(returns, axis=0))
    volume = rng.integers(1_000, 10_000, size=(num_days, num_nodes)).astype(float)
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in (("close", close), ("volume", volume)):
        frame = pd.DataFrame(values, index=pd.Index(dates.strftime("%Y-%m-%d"), name="date"),
                             columns=nodes)
        frame.to_csv(folder / f"{name}.csv")
    pd.DataFrame({"ticker": nodes, "sector": SECTORS}).to_csv(folder / "sectors.csv",
                                                              index=False)
    return folder


@pytest.fixture
def tiny_market(tmp_path) -> Path:
    return write_tiny_market(tmp_path / "market")


def load(path) -> dict:
    """A checkpoint file, loaded the safe way every file we write must allow."""
    return torch.load(path, map_location="cpu", weights_only=True)


def names(folder) -> list:
    """Sorted file names of ``folder`` (empty when it does not exist)."""
    folder = Path(folder)
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def fit_args(data_path, run_dir, max_epochs: int = 2, extra=()) -> list:
    """Command-line arguments of a fit that takes seconds on one CPU core."""
    run_dir = Path(run_dir)
    return [
        "fit",
        "--config", str(Path(__file__).resolve().parents[1] / "configs" / "default_config.yaml"),
        f"--data.path={data_path}",
        "--data.start_date=null",
        "--data.window_sizes=[5, 10]",
        "--data.batch_size=8",
        "--data.num_center_nodes=3",
        "--model.hidden_size=16",
        "--model.num_heads=2",
        "--trainer.accelerator=cpu",
        f"--trainer.max_epochs={max_epochs}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={run_dir / 'logs'}",
        f"--training.save_dir={run_dir / 'checkpoints'}",
        f"--training.predictions_path={run_dir / 'predictions.csv'}",
        *extra,
    ]


@pytest.fixture
def run_fit():
    """Run ``train.py`` in-process with the given arguments; returns the LightningCLI."""
    from train import main

    def _run(args):
        return main(args)

    return _run


def shared_data_or_skip(name: str) -> Path:
    """The real data set ``name`` under ../shared/data, or skip with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real market data {path} is absent (a user's clone has no ../shared)")
    return path
