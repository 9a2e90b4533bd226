"""Helpers shared by the benchmark scripts: machine description, data paths, tables, timing."""

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default_config.yaml"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or ``n/a`` where the OS has none."""
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def machine_line(threads: int) -> str:
    """One line naming the machine, the software and the load, printed above every table."""
    import torch

    return (f"{datetime.date.today()} | {os.cpu_count()} cores, {cpu_model()} | torch "
            f"{torch.__version__}, {threads} torch thread(s) | Python "
            f"{platform.python_version()} | load average {load_average()}")


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads so that runs on a shared machine stay comparable."""
    import torch

    torch.set_num_threads(threads)


def data_folder(path: str) -> Path:
    """The data folder ``path``, or exit with a message saying where the data was expected.

    Raises:
        SystemExit: the folder does not exist.
    """
    folder = Path(path)
    if not folder.is_dir():
        sys.exit(f"Data folder {folder.resolve()} not found. The benchmarks read the real data "
                 f"of ../shared/data (see that folder's README); pass --data PATH to point "
                 f"elsewhere.")
    return folder


def print_table(headers: list, rows: list) -> None:
    """Print a Markdown table (so that results paste into the README unchanged)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[i]) for row in cells))
              for i, header in enumerate(headers)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")


def best_of(function, repeats: int) -> float:
    """The shortest wall time of ``repeats`` calls of ``function`` (seconds)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def mean_and_spread(values: list) -> str:
    """``mean ± sample std`` of ``values`` with 4 decimals (``±0`` for a single value)."""
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.4f} ± {spread:.4f}"


def app_arguments(workdir, extra=()) -> list:
    """Arguments of the app's default configuration with every output under ``workdir``.

    The progress bar is off (it prints per step); everything else is the default config.
    """
    workdir = Path(workdir)
    return [
        "--config", str(DEFAULT_CONFIG),
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={workdir / 'logs'}",
        f"--training.save_dir={workdir / 'checkpoints'}",
        f"--training.predictions_path={workdir / 'predictions.csv'}",
        *extra,
    ]


def build_app(workdir, extra=()):
    """The app's LightningCLI with model, data module and Trainer built, nothing run yet.

    Returns:
        The ``GatedGNNCLI``; use ``.trainer``, ``.model`` and ``.datamodule``.
    """
    from datamodules.market_datamodule import MarketDataModule
    from lit_models.lit_gated_gnn import GatedGNNModule
    from train import GatedGNNCLI

    return GatedGNNCLI(GatedGNNModule, MarketDataModule, run=False,
                       save_config_kwargs={"overwrite": True},
                       args=app_arguments(workdir, extra))


def quiet_logs() -> None:
    """Keep the app's INFO lines (splits, preflight, report) out of the benchmark tables."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "callbacks",
                 "datamodules", "lit_models", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
