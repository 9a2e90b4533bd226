"""Training throughput of the app against a bare PyTorch loop, measured in one run.

Both sides train a ``GatedGraphNet`` of the default configuration on the very same batches:
one epoch of the data module's training batches is drawn once and served every epoch, in the
same order, by a ``DataLoader`` over that list; the bare loop trains on the batch objects the
app's loop received (so the app alone pays for fetching them). The app is the Lightning
Trainer with the module and every callback of the default configuration (progress bar off);
the bare loop is forward, cross-entropy over labelled nodes, backward, gradient-norm clipping
at the configured value, an AdamW step with the module's settings and a cosine step per epoch,
on its own copy of the model.

The two alternate inside one fit, so that a change of load on a shared machine hits both:
after every ``--chunk`` app steps, a callback trains the bare loop on the same batches. An app
epoch is its wall time minus the bare steps inside it and minus its validation loop, so it
holds every training hook, logging, the epoch-end checkpoint and Lightning's own bookkeeping.
The first epoch of each side is warm-up and not counted.

Run: ``python bench/framework_cost.py [--rounds 5 --steps 0 --threads 1]`` (``--steps 0``:
one full epoch of the default data per round).
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    build_app,
    machine_line,
    print_table,
    quiet_logs,
    set_threads,
)


def draw_batches(datamodule, steps: int) -> list:
    """The first ``steps`` training batches of epoch 0 (all of them for ``steps <= 0``)."""
    datamodule.setup("fit")
    batches = []
    for batch in datamodule.train_dataloader():
        batches.append(batch)
        if 0 < steps <= len(batches):
            break
    return batches


def fixed_loader(batches: list):
    """A DataLoader that yields ``batches`` unchanged, in order, every epoch."""
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=lambda batch: batch)


class BareLoop:
    """The plain PyTorch training loop over a copy of the module's network.

    The caller steps ``scheduler`` once per epoch, as Lightning does for the app.

    Args:
        module: the app's ``GatedGNNModule`` (its network, learning rate, weight decay and
            cosine settings are copied).
        clip_norm: total gradient norm to clip to (the Trainer's ``gradient_clip_val``).
        max_epochs: cosine period, as the module's scheduler uses.
    """

    def __init__(self, module, clip_norm: float, max_epochs: int):
        import torch

        hp = module.hparams
        self.clip_norm = clip_norm
        self.model = copy.deepcopy(module.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=hp.learning_rate,
                                           weight_decay=hp.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=max_epochs, eta_min=hp.min_learning_rate)

    def steps(self, batches) -> float:
        """Train one step per batch of ``batches``; returns the wall time in seconds."""
        import torch
        import torch.nn.functional as F

        from lit_models.batching import to_graph_batch

        self.model.train()
        start = time.perf_counter()
        with torch.enable_grad():
            for batch in batches:
                graph = to_graph_batch(batch)
                output = self.model(graph.x, graph.bar_mask, graph.has_input, graph.node_index,
                                    graph.edge_index)
                labelled = graph.labelled
                loss = F.cross_entropy(output.logits[labelled], graph.label[labelled])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
                self.optimizer.step()
        return time.perf_counter() - start


def make_interleaver(bare: BareLoop, chunk: int):
    """A callback that runs bare steps between app steps and times both sides.

    After every ``chunk`` app steps (and at the end of each epoch) the bare loop trains on
    the same ``chunk`` batches. An app epoch's time is its wall time minus the bare steps run
    inside it and minus its validation loop.
    """
    import lightning as L

    class Interleaver(L.Callback):
        def __init__(self):
            self.bare_times, self.app_times = [], []
            self._pending, self._bare, self._excluded = [], 0.0, 0.0
            self._app_start = None
            self._validation_start = None

        def _run_bare(self) -> None:
            if self._pending:
                start = time.perf_counter()
                self._bare += bare.steps(self._pending)
                self._pending = []
                self._excluded += time.perf_counter() - start

        def _close_epoch(self) -> None:
            if self._app_start is None:
                return
            self.app_times.append(time.perf_counter() - self._app_start - self._excluded)
            self.bare_times.append(self._bare)
            self._app_start = None

        def on_train_epoch_start(self, trainer, pl_module):
            self._close_epoch()
            self._bare, self._excluded = 0.0, 0.0
            self._app_start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._pending.append(batch)
            if len(self._pending) >= chunk:
                self._run_bare()

        def on_validation_start(self, trainer, pl_module):
            self._run_bare()  # the epoch's last training batches
            self._validation_start = time.perf_counter()

        def on_validation_end(self, trainer, pl_module):
            if self._app_start is not None and not trainer.sanity_checking:
                self._excluded += time.perf_counter() - self._validation_start

        def on_train_epoch_end(self, trainer, pl_module):
            self._run_bare()
            start = time.perf_counter()
            bare.scheduler.step()
            self._excluded += time.perf_counter() - start

        def on_train_end(self, trainer, pl_module):
            self._close_epoch()

    return Interleaver()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured epochs of each side")
    parser.add_argument("--steps", type=int, default=0,
                        help="training batches per epoch (0: one full epoch of the data)")
    parser.add_argument("--chunk", type=int, default=10,
                        help="app steps between two runs of the bare loop")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    quiet_logs()

    epochs = args.rounds + 1
    with tempfile.TemporaryDirectory(prefix="framework_cost_") as workdir:
        cli = build_app(workdir, [f"--trainer.max_epochs={epochs}"])
        batches = draw_batches(cli.datamodule, args.steps)
        loader = fixed_loader(batches)
        cli.datamodule.train_dataloader = lambda: loader
        bare = BareLoop(cli.model, cli.trainer.gradient_clip_val, epochs)
        interleaver = make_interleaver(bare, args.chunk)
        cli.trainer.callbacks.insert(0, interleaver)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        days_per_epoch = sum(len(batch) for batch in batches)
        num_callbacks = len(cli.trainer.callbacks) - 1

    app, bare_times = interleaver.app_times[1:], interleaver.bare_times[1:]
    ratios = [a / b for a, b in zip(app, bare_times)]
    print(machine_line(args.threads))
    print(f"Default config (embedded data), {len(batches)} steps x {len(batches[0])} days per "
          f"epoch, {len(app)} measured epochs per side after one warm-up each; app = Trainer "
          f"+ module + {num_callbacks} callbacks, validation excluded")
    print()
    rows = [[f"round {i + 1}", f"{days_per_epoch / b:.1f}", f"{days_per_epoch / a:.1f}",
             f"{r:.3f}"] for i, (a, b, r) in enumerate(zip(app, bare_times, ratios))]
    rows.append(["all rounds", f"{days_per_epoch * len(bare_times) / sum(bare_times):.1f}",
                 f"{days_per_epoch * len(app) / sum(app):.1f}",
                 f"**{sum(app) / sum(bare_times):.3f}** (median {statistics.median(ratios):.3f})"])
    print_table(["epoch", "bare PyTorch days/s", "app days/s", "app time / bare time"], rows)


if __name__ == "__main__":
    main()
