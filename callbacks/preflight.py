"""The user's before-training checklist, run when fit starts and by ``ckpt.py doctor``.

Items, each ✔ (fine), ⚠ (worth a look) or ✘ (training would fail or lose files):

* disk space: free bytes in ``save_dir`` against an estimate of what the checkpoints need,
  ``parameter bytes × 3`` (weights and two Adam moments) per file, times
  ``keep_last + best + error slots + one temporary file``, times a margin; where no estimate
  can be made, ``training.min_free_disk_gb`` (the user's 10 GB) is the bar;
* write probe: a small file is written, fsynced and removed in ``save_dir`` (a missing
  ``save_dir`` is tried under its nearest existing parent and not left behind);
* device memory: free and total memory of the CUDA or MPS device (``CPU: n/a``);
* batch memory: ``data.batch_size`` and ``data.num_center_nodes`` against an estimate of the
  activation memory of one day (see :func:`estimate_batch_memory`);
* learning rate: outside ``[1e-6, 1e-2]`` is unusual (the user's default is 5e-5);
* data: the share of masked bars, days with too few labelled nodes for the quantile classes,
  and nodes with no edges in the graph;
* dry run (optional): one training batch forward and backward on the device, with the RNG
  state saved and restored and gradients cleared, so the run itself is unchanged.

Without the dry run the checks take well under a second on the shipped data.
"""

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from callbacks.checkpoint_io import TEMPORARY_PREFIX, TEMPORARY_SUFFIX, free_disk_bytes
from callbacks.checkpoint_summary import format_size

log = logging.getLogger(__name__)

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
SYMBOLS = {OK: "✔", WARN: "⚠", FAIL: "✘", SKIP: "–"}

GIGABYTE = 1024 ** 3
BYTES_PER_FLOAT = 4
# Copies of the parameters in a checkpoint: the weights and AdamW's two moment estimates.
CHECKPOINT_PARAMETER_COPIES = 3
# Error, validation-error and NaN files a run may add next to its epoch and best files.
ERROR_SLOTS = 3
# Histories, hyperparameters and Lightning's bookkeeping, beyond the tensors.
CHECKPOINT_OVERHEAD_BYTES = 256 * 1024
DISK_MARGIN = 2.0
PROBE_BYTES = 4096

# Floats kept for backward per node, time step and hidden unit: the input projection, the
# three GRU gates, the new hidden state, plus slack; a Transformer layer keeps about three
# times that (checked against the tensors autograd saves on the shipped data).
FLOATS_PER_STEP = {"gru": 8, "transformer": 24}
# Floats per node and hidden unit outside the encoder: embedding, gate, fusion, head.
FLOATS_PER_NODE = 8
# Floats per edge, hidden unit and graph layer: message, attention weight, gathered sum.
FLOATS_PER_EDGE = 3
# Backward roughly doubles the activation memory of a training batch.
BACKWARD_FACTOR = 2
# Weights, gradients and the two AdamW moments live on the device during training.
TRAINING_PARAMETER_COPIES = 4
MEMORY_WARN_SHARE = 0.5
DEVICE_FREE_WARN_SHARE = 0.1

LEARNING_RATE_RANGE = (1e-6, 1e-2)
USER_DEFAULT_LEARNING_RATE = 5e-5
MASKED_BARS_WARN_SHARE = 0.5
MIN_NODES_PER_CLASS = 2
SMALL_DAYS_WARN_SHARE = 0.1
ISOLATED_NODES_WARN_SHARE = 0.25


class PreflightError(RuntimeError):
    """A ✘ item of the preflight checklist: fit would fail or lose its files."""


@dataclass
class CheckItem:
    """One line of the checklist."""

    name: str
    status: str
    detail: str

    @property
    def line(self) -> str:
        return f"{SYMBOLS[self.status]} {self.name:<14} {self.detail}"


@dataclass
class Checklist:
    """Items in order, and the seconds the checks took."""

    items: list = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(item.status == status for item in self.items)

    def passed(self, strict: bool = False) -> bool:
        """No ✘, and with ``strict`` no ⚠ either."""
        bad = (FAIL, WARN) if strict else (FAIL,)
        return not any(item.status in bad for item in self.items)

    def lines(self) -> list:
        header = f"Preflight checklist ({self.seconds:.1f} s)"
        footer = f"{self.count(WARN)} warning(s), {self.count(FAIL)} failure(s)"
        return [header] + ["  " + item.line for item in self.items] + [footer]


def run_checks(model: L.LightningModule, datamodule, trainer: L.Trainer | None,
               save_dir, keep_last: int, min_free_disk_gb: float,
               dry_run: bool = False) -> Checklist:
    """Run every check; a check that cannot run becomes a ⚠ item naming why.

    Args:
        model: the LightningModule (its parameters and hyperparameters are read).
        datamodule: the data module, set up (its ``market`` is read when present).
        trainer: gives the device and the optimizer's learning rate; may be None.
        save_dir: folder of the checkpoint files.
        keep_last: epoch files kept (``training.keep_last``).
        min_free_disk_gb: free disk demanded when no size estimate can be made.
        dry_run: also run one training batch forward and backward.
    """
    started = time.perf_counter()
    device = _device(model, trainer)
    checks = [
        ("disk space", lambda: check_disk(save_dir, model, keep_last, min_free_disk_gb)),
        ("write probe", lambda: check_write(save_dir)),
        ("device memory", lambda: check_device_memory(device)),
        ("batch memory", lambda: check_batch_memory(model, datamodule, device)),
        ("learning rate", lambda: check_learning_rate(_learning_rate(model, trainer))),
        ("masked bars", lambda: check_masked_bars(datamodule)),
        ("day sizes", lambda: check_day_sizes(datamodule)),
        ("graph edges", lambda: check_isolated_nodes(datamodule)),
        ("dry run", lambda: (check_dry_run(model, datamodule, device) if dry_run else
                             (SKIP, "not run (--dry-run or training.preflight_dry_run=true)"))),
    ]
    checklist = Checklist()
    for name, check in checks:
        try:
            status, detail = check()
        except Exception as error:  # noqa: BLE001 - a broken check must not stop the others
            status, detail = WARN, f"could not check: {type(error).__name__}: {error}"
        checklist.items.append(CheckItem(name, status, detail))
    checklist.seconds = time.perf_counter() - started
    return checklist


class Preflight(Callback):
    """Runs the checklist when fit starts; a ✘ stops fit before the first step.

    Args:
        save_dir: folder of the checkpoint files.
        keep_last: epoch files kept.
        min_free_disk_gb: free disk demanded when no size estimate can be made.
        dry_run: include a one-batch forward and backward.
    """

    def __init__(self, save_dir, keep_last: int = 5, min_free_disk_gb: float = 10.0,
                 dry_run: bool = False):
        self.save_dir = Path(save_dir)
        self.keep_last = keep_last
        self.min_free_disk_gb = min_free_disk_gb
        self.dry_run = dry_run
        self.checklist: Checklist | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.checklist = run_checks(pl_module, trainer.datamodule, trainer, self.save_dir,
                                    self.keep_last, self.min_free_disk_gb, self.dry_run)
        text = "\n".join(self.checklist.lines())
        if trainer.is_global_zero:
            if self.checklist.passed(strict=True):
                log.info(text)
            else:
                log.warning(text)
        if not self.checklist.passed():
            failures = [item.line for item in self.checklist.items if item.status == FAIL]
            raise PreflightError(
                "Preflight failed, fit not started:\n  " + "\n  ".join(failures)
                + "\nFix the items above, or set training.preflight=false to skip the checks.")


def check_disk(save_dir, model, keep_last: int, min_free_disk_gb: float) -> tuple:
    """Free disk in ``save_dir`` against the estimate of the module docstring."""
    free = free_disk_bytes(save_dir)
    per_file = checkpoint_size_estimate(model)
    if per_file is None:
        needed = min_free_disk_gb * GIGABYTE
        detail = (f"{format_size(free)} free in {save_dir}; no size estimate, so "
                  f"training.min_free_disk_gb={min_free_disk_gb:g} is the bar")
        return (OK if free >= needed else WARN), detail

    files = keep_last + 1 + ERROR_SLOTS + 1
    needed = per_file * files * DISK_MARGIN
    detail = (f"{format_size(free)} free in {save_dir}; need ≈ {format_size(needed)} "
              f"({files} files of ≈ {format_size(per_file)} × {DISK_MARGIN:g} margin)")
    return (OK if free >= needed else FAIL), detail


def checkpoint_size_estimate(model) -> int | None:
    """Bytes of one full checkpoint: parameters × 3 plus an allowance; None when unknown."""
    parameter_bytes = _parameter_bytes(model)
    if not parameter_bytes:
        return None
    return parameter_bytes * CHECKPOINT_PARAMETER_COPIES + CHECKPOINT_OVERHEAD_BYTES


def check_write(save_dir) -> tuple:
    """Write, fsync and delete a small probe file in ``save_dir``.

    A missing ``save_dir`` is not created (the checklist leaves no trace): its folders are
    created and removed again under the nearest existing parent instead.
    """
    folder = Path(save_dir).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    missing = folder.relative_to(existing).parts
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        if missing:
            # Created and removed again: the same steps fit will take, without the trace.
            with tempfile.TemporaryDirectory(prefix=TEMPORARY_PREFIX, dir=existing) as scratch:
                _write_probe(Path(scratch).joinpath(*missing))
        else:
            _write_probe(folder)
    except OSError as error:
        return FAIL, f"cannot write in {folder}: {error.strerror or error}"
    if missing:
        return OK, f"{folder} can be created and written (under {existing})"
    return OK, f"{folder} is writable"


def _write_probe(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, probe = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}probe.",
                                         suffix=TEMPORARY_SUFFIX, dir=folder)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        Path(probe).unlink(missing_ok=True)


def check_device_memory(device: torch.device) -> tuple:
    """Free and total memory of a CUDA or MPS device; ``CPU: n/a``."""
    memory = device_memory(device)
    if device.type == "cpu" or memory is None:
        return OK, f"{device.type.upper()}: n/a"
    free, total = memory
    detail = f"{device}: {format_size(free)} free of {format_size(total)}"
    if free < DEVICE_FREE_WARN_SHARE * total:
        return WARN, detail + " (another process holds most of it?)"
    return OK, detail


def device_memory(device: torch.device) -> tuple | None:
    """``(free, total)`` bytes of the device's memory (system memory for the CPU); or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "mps":
        total = torch.mps.recommended_max_memory()
        return max(total - torch.mps.driver_allocated_memory(), 0), total
    return _system_memory()


def _system_memory() -> tuple | None:
    # MemAvailable counts reclaimable page cache too, unlike the free-pages count of sysconf.
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return (int(fields["MemAvailable"].split()[0]) * 1024,
                int(fields["MemTotal"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None


def estimate_batch_memory(model, datamodule) -> dict:
    """Rough activation memory of a day and of a training and a validation batch, in bytes.

    A node costs ``4 × hidden × (Σ windows × floats per step + floats per node)`` bytes (plus
    ``4 × heads × Σ window²`` for Transformer attention), an edge ``4 × hidden × 3`` per graph
    layer. A training sample holds the centers and their neighbours (the worst case: the
    highest-degree nodes), and backward doubles its cost; a validation batch holds every node
    of ``batch_size`` days. Parameters, gradients and AdamW's moments come on top.

    Returns:
        ``per_day``, ``train_batch``, ``val_batch``, ``parameters`` and ``total`` bytes, and the
        ``train_nodes`` of one training sample.
    """
    hp, data = model.hparams, datamodule.hparams
    market = datamodule.market
    hidden = hp.get("hidden_size", 64)
    encoder = hp.get("encoder", "gru")
    windows = list(data.get("window_sizes", [20, 40, 80]))
    per_node = BYTES_PER_FLOAT * hidden * (sum(windows) * FLOATS_PER_STEP.get(encoder, 24)
                                           + FLOATS_PER_NODE)
    if encoder == "transformer":
        per_node += BYTES_PER_FLOAT * hp.get("num_heads", 4) * sum(w * w for w in windows)
    per_edge = BYTES_PER_FLOAT * hidden * FLOATS_PER_EDGE * hp.get("num_graph_layers", 1)

    degree = np.asarray(market.degree)
    num_nodes, num_edges = len(degree), int(np.asarray(market.edge_index).shape[1])
    per_day = num_nodes * per_node + num_edges * per_edge
    if data.get("cross_sectional", True):
        centers = min(data.get("num_center_nodes", 8), num_nodes)
        train_nodes = min(num_nodes, centers + int(np.sort(degree)[::-1][:centers].sum()))
        mean_edges = num_edges / max(num_nodes, 1)
        sample = train_nodes * per_node + train_nodes * mean_edges * per_edge
        train_batch = data.get("batch_size", 4) * sample * BACKWARD_FACTOR
        val_batch = data.get("batch_size", 4) * per_day
    else:
        train_nodes = data.get("pooled_batch_size", 512)
        train_batch = train_nodes * (per_node + per_edge) * BACKWARD_FACTOR
        val_batch = train_batch / BACKWARD_FACTOR
    parameters = _parameter_bytes(model) * TRAINING_PARAMETER_COPIES
    return {"per_day": per_day, "train_batch": train_batch, "val_batch": val_batch,
            "parameters": parameters, "train_nodes": train_nodes,
            "total": max(train_batch, val_batch) + parameters}


def check_batch_memory(model, datamodule, device: torch.device) -> tuple:
    """The estimate of :func:`estimate_batch_memory` against the device's free memory."""
    if getattr(datamodule, "market", None) is None:
        return WARN, "not checked: the data module exposes no prepared market"
    estimate = estimate_batch_memory(model, datamodule)
    data = datamodule.hparams
    setting = (f"batch_size={data.get('batch_size')}, "
               f"num_center_nodes={data.get('num_center_nodes')}")
    detail = (f"{setting}: ≈ {format_size(estimate['per_day'])} per full day, "
              f"training batch ≈ {format_size(estimate['train_batch'])}, "
              f"validation batch ≈ {format_size(estimate['val_batch'])}")
    memory = device_memory(device)
    if memory is None:
        return OK, detail
    # TODO(multi-device runs): one device is assumed; under DDP each rank holds its own batch
    # and the estimate holds per device, but model-sharding strategies would need their own.
    free = memory[0]
    detail += f"; ≈ {format_size(estimate['total'])} of {format_size(free)} free"
    advice = (" — lower data.batch_size (advised 4-8) or data.num_center_nodes (6-8), or use "
              "trainer.accumulate_grad_batches")
    if estimate["total"] > free:
        return FAIL, detail + advice
    if estimate["total"] > MEMORY_WARN_SHARE * free:
        return WARN, detail + advice
    return OK, detail


def check_learning_rate(learning_rate: float | None) -> tuple:
    """⚠ outside ``LEARNING_RATE_RANGE``; ✘ when not a positive finite number."""
    if learning_rate is None:
        return WARN, "not found in the optimizer or model.learning_rate"
    low, high = LEARNING_RATE_RANGE
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        return FAIL, f"{learning_rate} must be a positive number"
    if not low <= learning_rate <= high:
        return WARN, (f"{learning_rate:g} is outside [{low:g}, {high:g}] (NaN losses above, no "
                      f"progress below; the user's default is {USER_DEFAULT_LEARNING_RATE:g})")
    return OK, f"{learning_rate:g} within [{low:g}, {high:g}]"


def check_masked_bars(datamodule) -> tuple:
    """Share of (day, node) bars without a usable daily return (missing, or a data error)."""
    market = getattr(datamodule, "market", None)
    if market is None:
        return WARN, "not checked: the data module exposes no prepared market"
    returns = np.asarray(market.builder.log_return)[1:]  # (days - 1, nodes)
    if returns.size == 0:
        return FAIL, "no bars at all"
    share = float((~np.isfinite(returns)).mean())
    detail = (f"{share:.1%} of {returns.size} bars masked (missing, or a move beyond "
              f"data.max_abs_return)")
    if share >= 1.0:
        return FAIL, detail
    return (WARN if share > MASKED_BARS_WARN_SHARE else OK), detail


def check_day_sizes(datamodule) -> tuple:
    """Training days with fewer labelled nodes than ``MIN_NODES_PER_CLASS × num_classes``."""
    market = getattr(datamodule, "market", None)
    if market is None:
        return WARN, "not checked: the data module exposes no prepared market"
    days = np.asarray(datamodule.split_days.get("train", []))
    if len(days) == 0:
        return FAIL, "no training days"
    num_classes = datamodule.hparams.get("num_classes", 5)
    minimum = MIN_NODES_PER_CLASS * num_classes
    labelled = (np.asarray(market.labels)[days] >= 0).sum(axis=1)  # (days,)
    small = int((labelled < minimum).sum())
    detail = (f"{small} of {len(days)} training days have fewer than {minimum} labelled nodes "
              f"({MIN_NODES_PER_CLASS} per class); median {int(np.median(labelled))} per day")
    if small == len(days):
        return FAIL, detail
    return (WARN if small > SMALL_DAYS_WARN_SHARE * len(days) else OK), detail


def check_isolated_nodes(datamodule) -> tuple:
    """Nodes without a neighbour (they still see themselves through a self-loop)."""
    market = getattr(datamodule, "market", None)
    if market is None:
        return WARN, "not checked: the data module exposes no prepared market"
    degree = np.asarray(market.degree)
    graph = datamodule.hparams.get("graph", "group")
    if graph == "none":
        return OK, "data.graph=none: self-loops only, by choice"
    isolated = int((degree == 0).sum())
    detail = (f"{isolated} of {len(degree)} nodes have no edges (graph {graph}); mean degree "
              f"{degree.mean():.1f}")
    return (WARN if isolated > ISOLATED_NODES_WARN_SHARE * len(degree) else OK), detail


def check_dry_run(model, datamodule, device: torch.device) -> tuple:
    """One training batch forward and backward; the model's weights and the RNG are unchanged.

    The loss is the module's (cross-entropy over labelled nodes), computed on the bare model
    that ``model.model`` exposes.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from lit_models.batching import to_graph_batch

    started = time.perf_counter()
    was_training = model.training
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        # Starting a DataLoader draws a seed and dropout draws numbers: both stay inside.
        with torch.random.fork_rng(devices=fork_devices):
            batch = next(iter(datamodule.train_dataloader()))
            graph = to_graph_batch(move_data_to_device(batch, device))
            model.train()
            output = model.model(graph.x, graph.bar_mask, graph.has_input, graph.node_index,
                                 graph.edge_index)
            labelled = graph.labelled
            loss = torch.nn.functional.cross_entropy(output.logits[labelled],
                                                     graph.label[labelled])
            loss.backward()
        loss_value = loss.item()
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        finite = all(bool(torch.isfinite(g).all()) for g in gradients)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    seconds = time.perf_counter() - started
    detail = (f"{graph.num_days} day(s), {graph.x.shape[0]} nodes: loss {loss_value:.4f}, "
              f"{seconds:.2f} s")
    if device.type == "cuda":
        detail += f", peak {format_size(torch.cuda.max_memory_allocated(device))}"
    if not math.isfinite(loss_value) or not finite:
        return FAIL, detail + " — NaN/Inf in the loss or gradients: check inputs and lr"
    return OK, detail


def _device(model, trainer) -> torch.device:
    if trainer is not None:
        return trainer.strategy.root_device
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _learning_rate(model, trainer) -> float | None:
    optimizers = getattr(trainer, "optimizers", None) if trainer is not None else None
    if optimizers:
        return float(optimizers[0].param_groups[0]["lr"])
    value = getattr(model, "hparams", {}).get("learning_rate")
    return None if value is None else float(value)


def _parameter_bytes(model) -> int:
    try:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    except (ValueError, RuntimeError):
        # Lazy modules have no size before their first forward.
        return 0
