"""The fault suite: kill -9 at random instants, failing saves, bad input files.

The kills come from a seeded random plan over the events of a fit (training and validation
steps, and every phase of a checkpoint write: the bytes, fsync, rename, folder fsync, pruning);
each killed run is followed by the same command with ``--ckpt_path last``, as a supervisor would
run it, until the run completes. Every file under a checkpoint name must load after every kill,
and each completed run must equal an uninterrupted one bit for bit.
"""

import errno
import gzip
import logging
import os
import random

import pytest
import torch
from conftest import fit_args, load, names, write_tiny_market
from fault_injection import fork_server

from callbacks.checkpoint_files import classify
from callbacks.checkpoint_io import TEMPORARY_SUFFIX
from datamodules.loading import DataFormatError
from train import main

pytestmark = pytest.mark.faults

QUIET = ["--training.report=false", "--training.preflight=false", "--trainer.deterministic=true",
         "--training.keep_last=2"]
EPOCHS = 4
STEPS_PER_EPOCH = 18
KILLS = 24
SEED = 20240611
# event -> (weight, range of the count at which the process is killed). Every run starts with
# the sanity check (2 validation steps, so counts from 3 fall in an epoch's validation of 4
# steps), and a checkpoint write does 2 fsyncs.
EVENTS = {
    "train_step": (6, (1, 40)),
    "val_step": (4, (3, 12)),
    "write": (4, (1, 4)),
    "fsync": (2, (1, 8)),
    "replace": (2, (1, 4)),
    "replaced": (2, (1, 4)),
    "unlink": (2, (1, 2)),
}


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return write_tiny_market(tmp_path_factory.mktemp("market"))


def assert_no_torn_file(folder, after: str) -> None:
    """Every file under a checkpoint name loads with weights_only; the rest are temporaries."""
    for name in names(folder):
        if classify(name)[0] is None:
            assert name.endswith(TEMPORARY_SUFFIX), f"{name} after {after}"
            continue
        checkpoint = load(folder / name)  # raises on a torn file
        assert isinstance(checkpoint.get("epoch"), int), f"{name} after {after}"


def assert_complete(folder, reference) -> None:
    """The run closed every epoch and ended where an uninterrupted run ends."""
    files = names(folder)
    assert f"epoch_{EPOCHS - 1}.pth" in files and f"epoch_{EPOCHS - 2}.pth" in files, files
    assert not [name for name in files if classify(name)[0] in ("error", "val_error", "preempt")]
    final, expected = load(folder / f"epoch_{EPOCHS - 1}.pth"), load(reference)
    assert final["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert final["train_history"] == expected["train_history"]
    assert final["val_history"] == expected["val_history"]
    for name, tensor in expected["model_state_dict"].items():
        assert torch.equal(tensor, final["model_state_dict"][name]), name
    assert load(folder / "best_model.pth")["best"] == expected["best"]


def test_kill_9_at_random_instants_then_resume_from_last_never_loses_the_run(
        market, tmp_path, tmp_path_factory):
    server = fork_server(tmp_path_factory.getbasetemp())

    def run(run_dir, log, kill=None) -> int:
        faults = {"kill": kill} if kill else {}
        args = fit_args(market, run_dir, EPOCHS, [*QUIET, "--ckpt_path=last"])
        [result] = server.run([{"args": args, "log": str(log), "faults": faults}], timeout=120)
        assert result["exit"] in (0, -9), log.read_text()[-3000:]
        return result["exit"]

    assert run(tmp_path / "whole", tmp_path / "whole.log") == 0
    reference = tmp_path / "whole" / "checkpoints" / f"epoch_{EPOCHS - 1}.pth"

    plan = random.Random(SEED)
    kills, completed, campaign, attempt = [], 0, 0, 0
    while len(kills) < KILLS:
        attempt += 1
        assert attempt < 3 * KILLS, f"only {len(kills)} kills landed: {kills}"
        event = plan.choices(list(EVENTS), weights=[weight for weight, _ in EVENTS.values()])[0]
        kill = {"event": event, "count": plan.randint(*EVENTS[event][1]),
                "fraction": round(plan.uniform(0.02, 0.98), 3)}
        run_dir = tmp_path / f"campaign{campaign}"
        if run(run_dir, tmp_path / f"attempt{attempt}.log", kill) == -9:
            kills.append(kill)
            assert_no_torn_file(run_dir / "checkpoints", after=f"kill {kill}")
            continue
        assert_complete(run_dir / "checkpoints", reference)  # finished before the instant came
        completed, campaign = completed + 1, campaign + 1
    run_dir = tmp_path / f"campaign{campaign}"
    if run_dir.exists():
        assert run(run_dir, tmp_path / "final.log") == 0
        assert_no_torn_file(run_dir / "checkpoints", after="the final resume")
        assert_complete(run_dir / "checkpoints", reference)
        completed += 1

    assert completed >= 1
    killed_in = {kill["event"] for kill in kills}
    assert {"train_step", "val_step"} <= killed_in
    assert killed_in & {"write", "fsync", "replace", "replaced", "unlink"}


# Each of the three epochs fails a different way; the first save of each epoch leaves some
# bytes behind in its temporary file, as a real full disk does.
FAILURES = {1: errno.ENOSPC, 2: errno.EACCES, 3: errno.EFBIG}


def test_save_failures_on_every_save_for_three_epochs_then_rotation_recovers(
        market, tmp_path, monkeypatch, caplog):
    real_save = torch.save

    def failing_save(obj, handle, *args, **kwargs):
        code = FAILURES.get(obj.get("epoch")) if isinstance(obj, dict) else None
        if code is not None and "model_state_dict" in obj:
            handle.write(b"\0" * 4096)
            raise OSError(code, os.strerror(code))
        return real_save(obj, handle, *args, **kwargs)

    torch.set_num_threads(1)
    monkeypatch.setattr(torch, "save", failing_save)
    with caplog.at_level(logging.WARNING, logger="callbacks.checkpoint"):
        cli = main(fit_args(market, tmp_path, 6, QUIET))

    assert cli.trainer.current_epoch == 6  # training went on
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["best_model.pth", "epoch_4.pth", "epoch_5.pth"]
    warnings = [record.getMessage() for record in caplog.records
                if record.getMessage().startswith("Could not save")]
    for epoch, code in FAILURES.items():
        assert any(f"epoch_{epoch}.pth: " in text and os.strerror(code) in text
                   and " free in " in text for text in warnings), (epoch, warnings)
    newest = load(folder / "epoch_5.pth")
    assert newest["callbacks"]["CheckpointManager"]["rotation"] == ["epoch_4.pth", "epoch_5.pth"]
    assert newest["train_history"]["epoch"] == list(range(6))
    assert load(folder / "best_model.pth")["epoch"] not in FAILURES


def write_cells(folder, file, row: int, column: int, value: str) -> None:
    path = folder / file
    lines = path.read_text().splitlines()
    cells = lines[row].split(",")
    cells[column] = value
    lines[row] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def rename_header(folder, file, old: str, new: str) -> None:
    path = folder / file
    text = path.read_text()
    path.write_text(text.replace(old, new, 1))


def truncate_gzip(folder) -> None:
    data = gzip.compress((folder / "close.csv").read_bytes())
    (folder / "close.csv").unlink()
    (folder / "close.csv.gz").write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "text in a price": (lambda folder: write_cells(folder, "close.csv", 31, 3, "n/a?"),
                        r"close\.csv: column 'N02' .*not a number at row 30 \(line 32\): 'n/a\?'"),
    "impossible date": (lambda folder: write_cells(folder, "close.csv", 41, 0, "2020-13-45"),
                        r"close\.csv: column 'date' .*not a date at row 40 \(line 42\)"),
    "negative price": (lambda folder: write_cells(folder, "close.csv", 51, 2, "-5"),
                       r"close\.csv: column 'N01' has a zero or negative price on 2020-"),
    "no date column": (lambda folder: rename_header(folder, "close.csv", "date,", "day,"),
                       r"close\.csv: missing column 'date'"),
    "unknown node in the group map": (
        lambda folder: rename_header(folder, "sectors.csv", "N03", "ZZZ"),
        r"sectors\.csv: column 'ticker' names node 'ZZZ' at row 3 \(line 5\)"),
    "truncated gzip file": pytest.param(
        truncate_gzip, r"close\.csv\.gz cannot be read.*truncated"),
    "empty file": pytest.param(
        lambda folder: (folder / "volume.csv").write_bytes(b""),
        r"volume\.csv cannot be read.*empty"),
}


@pytest.mark.parametrize(("damage", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_a_bad_input_file_stops_fit_before_training_naming_where(tmp_path, damage, message):
    market = write_tiny_market(tmp_path / "market")
    damage(market)

    with pytest.raises(DataFormatError, match=message):
        main(fit_args(market, tmp_path, 2, QUIET))
    assert names(tmp_path / "checkpoints") == []
