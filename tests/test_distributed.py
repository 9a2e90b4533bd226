"""Two CPU processes with DDP (gloo): one writer, agreed NaN and preemption decisions, one error
file and a bounded exit when a rank fails, IC over every validation day once, exact resume.

Most runs start both ranks from a fork server, as torchrun starts them; one runs the real
command line, where Lightning starts the second process itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import fit_args, load, names, write_tiny_market
from fault_injection import REPO, TESTS, ddp_env, fork_server

from callbacks.checkpoint_files import classify
from callbacks.preemption import PREEMPTED_EXIT_CODE

QUIET = ["--training.report=false", "--training.preflight=false", "--trainer.deterministic=true"]
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2"]
EPOCHS = 3
STEPS_PER_EPOCH = 9  # 144 training days, 8 per batch, half on each rank
VAL_DAYS = 29  # odd: the distributed sampler repeats one day to even the ranks out
NAN_AT = {"rank": 1, "epoch": 0, "batch": 2}
TIMEOUT = 120



def same_weights(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return fork_server(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return write_tiny_market(tmp_path_factory.mktemp("market"))


def ddp_fit(server, market, base: Path, run: str, folder: str, faults: dict, *extra) -> list:
    """Both ranks of one fit; returns their results; records go to ``base / run``."""
    runs = [{"args": fit_args(market, base / folder, EPOCHS, [*QUIET, *DDP, *extra]),
             "env": ddp_env(rank), "log": str(base / f"{run}.rank{rank}.log"),
             "faults": {**faults, "record": str(base / run)}} for rank in range(2)]
    results = server.run(runs, timeout=TIMEOUT)
    for rank, result in enumerate(results):
        assert not result.get("timed_out"), (base / f"{run}.rank{rank}.log").read_text()[-3000:]
    return [result["exit"] for result in results]


def records(base: Path, run: str, rank: int) -> dict:
    return json.loads((base / f"{run}.rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(server, market, tmp_path_factory):
    """An uninterrupted fit with a NaN loss on rank 1; the same fit stopped by SIGTERM on rank 1
    inside epoch 1; its resume from ``last``."""
    base = tmp_path_factory.mktemp("ddp")
    exits = {
        "whole": ddp_fit(server, market, base, "whole", "whole", {"nan": NAN_AT}),
        "stopped": ddp_fit(server, market, base, "stopped", "preempted", {
            "nan": NAN_AT,
            "kill": {"event": "train_step", "count": STEPS_PER_EPOCH + 4, "signal": "SIGTERM",
                     "rank": 1}}),
    }
    files_when_stopped = names(base / "preempted" / "checkpoints")
    preempt = load(base / "preempted" / "checkpoints" / "epoch_1_preempt.pth")
    exits["resumed"] = ddp_fit(server, market, base, "resumed", "preempted", {},
                               "--ckpt_path=last")
    return SimpleNamespace(base=base, exits=exits, files_when_stopped=files_when_stopped,
                           preempt=preempt, whole=base / "whole" / "checkpoints",
                           resumed=base / "preempted" / "checkpoints")


def test_every_rank_exits_cleanly_and_a_preempted_run_exits_75(runs):
    assert runs.exits == {"whole": [0, 0], "stopped": [PREEMPTED_EXIT_CODE] * 2,
                          "resumed": [0, 0]}


def test_only_rank_0_writes_files(runs):
    for run in ("whole", "stopped", "resumed"):
        assert records(runs.base, run, 1)["saves"] == []
        assert records(runs.base, run, 0)["saves"], run
    assert names(runs.whole) == ["best_model.pth", "epoch_0.pth", "epoch_0_nan.pth",
                                 "epoch_1.pth", "epoch_2.pth"]


def test_a_nan_loss_on_one_rank_makes_every_rank_skip_the_step(runs):
    info = load(runs.whole / "epoch_0_nan.pth")["nan_info"]
    assert info["ranks"] == [NAN_AT["rank"]] and info["non_finite"] == "loss"
    assert info["batch_idx"] == NAN_AT["batch"] and info["policy"] == "skip"
    state = load(runs.whole / "epoch_2.pth")["callbacks"]["NanGuard"]
    assert state["total"] == 1  # rank 0, whose own loss was finite, counted the skip
    # Had one rank stepped and the other not, the replicas would have drifted apart.
    assert same_weights(torch.load(runs.base / "whole.rank0.pt", weights_only=True),
                        torch.load(runs.base / "whole.rank1.pt", weights_only=True))


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(runs):
    assert runs.files_when_stopped == ["best_model.pth", "epoch_0.pth", "epoch_0_nan.pth",
                                       "epoch_1_preempt.pth"]
    assert runs.preempt["preempt_info"]["world_size"] == 2
    assert runs.preempt["global_step"] == STEPS_PER_EPOCH + 4
    for rank in range(2):
        assert records(runs.base, "stopped", rank)["batches"][-1][:2] == [1, 3]


def test_the_resume_continues_each_rank_with_its_next_batch(runs):
    for rank in range(2):
        whole = records(runs.base, "whole", rank)["batches"]
        assert records(runs.base, "stopped", rank)["batches"] + \
            records(runs.base, "resumed", rank)["batches"] == whole
    assert len(runs.preempt["callbacks"]["CheckpointManager"]["rng_ranks"]) == 2


def test_the_resumed_run_ends_with_the_uninterrupted_weights(runs):
    expected, resumed = load(runs.whole / "epoch_2.pth"), load(runs.resumed / "epoch_2.pth")
    assert same_weights(expected["model_state_dict"], resumed["model_state_dict"])
    assert resumed["val_history"] == expected["val_history"]


def test_ic_uses_every_validation_day_once(runs, server, market):
    """The distributed IC equals the IC of one process validating the same weights."""
    base = runs.base
    epoch_file = runs.whole / "epoch_2.pth"
    metrics = base / "validate.json"
    args = fit_args(market, base / "validate", 1, ["--training.report=false",
                                                   f"--ckpt_path={epoch_file}"])
    args[0] = "validate"
    [result] = server.run([{"args": args, "log": str(base / "validate.log"),
                            "faults": {"metrics": str(metrics)}}], timeout=TIMEOUT)
    assert result["exit"] == 0, (base / "validate.log").read_text()[-3000:]
    single = json.loads(metrics.read_text())

    saved = load(epoch_file)
    assert single["val_IC_days"] + single["val_IC_days_skipped"] == VAL_DAYS
    assert saved["val_IC"] == pytest.approx(single["val_IC"], rel=1e-6, abs=1e-9)
    assert saved["val_RankIC"] == pytest.approx(single["val_RankIC"], rel=1e-6, abs=1e-9)
    assert saved["val_history"]["ICIR"][-1] == pytest.approx(single["val_ICIR"], rel=1e-6)


@pytest.mark.parametrize(("stage", "rank", "name"), [
    ("train", 1, "epoch_1_error.pth"),
    ("val", 0, "epoch_1_val_error.pth"),
], ids=["train-rank1", "val-rank0"])
def test_an_exception_on_one_rank_gives_one_error_file_and_every_rank_exits(
        server, market, tmp_path, stage, rank, name):
    fault = {"raise": {"rank": rank, "epoch": 1, "batch": 1, "stage": stage}}
    exits = ddp_fit(server, market, tmp_path, "failed", "failed", fault)

    assert all(code not in (0, None) for code in exits)  # both ranks ended, none hung
    folder = tmp_path / "failed" / "checkpoints"
    errors = [file for file in names(folder) if classify(file)[0] in ("error", "val_error")]
    assert errors == [name]
    info = load(folder / name)["error_info"]
    assert info["type"] == "InjectedFault" and info["rank"] == rank
    assert info["message"] == f"injected {stage} failure on rank {rank}"
    other = (tmp_path / f"failed.rank{1 - rank}.log").read_text()
    assert "already holds the state of this step" in other


def test_lightning_launches_the_second_process_and_a_preemption_exits_75(market, tmp_path):
    """The user's command: ``--trainer.strategy=ddp --trainer.devices=2`` on the CPU."""
    faults = {"kill": {"event": "train_step", "count": STEPS_PER_EPOCH + 2, "signal": "SIGTERM",
                       "rank": 1}, "record": str(tmp_path / "launched")}
    env = {**os.environ, "GNN_TEST_FAULTS": json.dumps(faults), "PYTHONHASHSEED": "0"}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, str(TESTS / "ddp_script.py"),
               *fit_args(market, tmp_path, 2, [*QUIET, *DDP])]
    with open(tmp_path / "launched.log", "w") as log:
        child = subprocess.run(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                               timeout=240, check=False)

    output = (tmp_path / "launched.log").read_text()
    assert child.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    assert names(tmp_path / "checkpoints") == ["best_model.pth", "epoch_0.pth",
                                                "epoch_1_preempt.pth"]
    assert records(tmp_path, "launched", 1)["saves"] == []  # rank 1 ran, wrote nothing
    assert records(tmp_path, "launched", 1)["batches"][-1][:2] == [1, 1]
