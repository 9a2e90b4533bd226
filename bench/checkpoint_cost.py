"""Seconds per epoch checkpoint and its share of the epoch, inside real fits of the app.

For each data set, a fit of the default configuration (every callback on, progress bar off)
runs for a few full epochs. Around the checkpoint manager's epoch-end hook, which gathers the
state and writes ``epoch_{n}.pth`` (and ``best_model.pth`` when the monitored metric improves)
with fsync, this script measures the hook's wall time and, inside it, the time spent in the
file writes themselves. The epoch is timed from the start of its first training batch hook to
the end of the checkpoint hook, so it holds training, validation and every epoch-end hook.

Run: ``python bench/checkpoint_cost.py [--datasets embedded rsr_nyse --epochs 2]``.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    SHARED_DATA,
    build_app,
    data_folder,
    machine_line,
    print_table,
    quiet_logs,
    set_threads,
)

DATASETS = {"embedded": None, "sp500_5yr": "sp500_5yr", "rsr_nasdaq": "rsr_nasdaq",
            "rsr_nyse": "rsr_nyse"}


class EpochClock:
    """Times each epoch and the checkpoint manager's epoch-end hook (and the writes in it)."""

    def __init__(self):
        self.epoch_start: dict = {}
        self.rows: list = []
        self._writes: list = []

    def wrap(self, manager, checkpoint_module) -> None:
        """Replace ``manager.on_train_epoch_end`` and the module's ``atomic_save`` by timed
        versions that call the originals."""
        hook, save = manager.on_train_epoch_end, checkpoint_module.atomic_save

        def timed_save(payload, path):
            start = time.perf_counter()
            size = save(payload, path)
            self._writes.append((time.perf_counter() - start, size, Path(path).name))
            return size

        def timed_hook(trainer, pl_module):
            self._writes = []
            start = time.perf_counter()
            hook(trainer, pl_module)
            end = time.perf_counter()
            epoch = trainer.current_epoch
            self.rows.append({
                "epoch": epoch,
                "epoch_s": end - self.epoch_start[epoch],
                "hook_s": end - start,
                "write_s": sum(write[0] for write in self._writes),
                "files": [write[2] for write in self._writes],
                "bytes": max((write[1] for write in self._writes), default=0),
            })

        manager.on_train_epoch_end = timed_hook
        checkpoint_module.atomic_save = timed_save


def measure(dataset: str, data_root: Path, epochs: int, workdir: Path) -> list:
    """Fit ``epochs`` full epochs on ``dataset`` and return the clock's rows."""
    import lightning as L

    import callbacks.checkpoint as checkpoint_module
    from callbacks.checkpoint import CheckpointManager

    extra = [f"--trainer.max_epochs={epochs}"]
    if DATASETS[dataset] is not None:
        extra.append(f"--data.path={data_folder(data_root / DATASETS[dataset])}")
    cli = build_app(workdir / dataset, extra)
    clock = EpochClock()
    manager = next(c for c in cli.trainer.callbacks if isinstance(c, CheckpointManager))

    class EpochStart(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.epoch_start.setdefault(trainer.current_epoch, time.perf_counter())

    cli.trainer.callbacks.insert(0, EpochStart())
    original_save = checkpoint_module.atomic_save
    clock.wrap(manager, checkpoint_module)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        checkpoint_module.atomic_save = original_save
    nodes = cli.datamodule.market.num_nodes
    return [{**row, "dataset": dataset, "nodes": nodes,
             "steps": cli.trainer.num_training_batches,
             "val_days": len(cli.datamodule.split_days["val"])} for row in clock.rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["embedded", "rsr_nyse"],
                        choices=sorted(DATASETS))
    parser.add_argument("--data", default=str(SHARED_DATA), help="folder of the real data sets")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None,
                        help="where checkpoints are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    quiet_logs()

    for dataset in args.datasets:  # fail before any fit when a data folder is missing
        if DATASETS[dataset] is not None:
            data_folder(Path(args.data) / DATASETS[dataset])

    rows = []
    with tempfile.TemporaryDirectory(prefix="checkpoint_cost_") as scratch:
        workdir = Path(args.workdir or scratch)
        for dataset in args.datasets:
            rows += measure(dataset, Path(args.data), args.epochs, workdir)

    print(machine_line(args.threads))
    print(f"Default config, {args.epochs} full epochs per data set; checkpoint = the manager's "
          f"epoch-end hook (state gathered + files written with fsync)")
    print()
    print_table(
        ["data", "nodes", "epoch", "train steps", "val days", "epoch s", "checkpoint s",
         "of which writes s", "files", "file MB", "share of epoch"],
        [[row["dataset"], row["nodes"], row["epoch"], row["steps"], row["val_days"],
          f"{row['epoch_s']:.1f}", f"{row['hook_s']:.3f}", f"{row['write_s']:.3f}",
          " + ".join(row["files"]), f"{row['bytes'] / 2 ** 20:.2f}",
          f"{row['hook_s'] / row['epoch_s']:.2%}"] for row in rows],
    )


if __name__ == "__main__":
    main()
