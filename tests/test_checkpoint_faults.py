"""Checkpoints under faults: raising steps, NaN, full disks, file-size limits, kill -9, damage."""

import errno
import io
import logging
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from conftest import fit_args, load, names

from callbacks.checkpoint import CheckpointManager
from callbacks.checkpoint_io import TEMPORARY_SUFFIX
from lit_models.lit_gated_gnn import GatedGNNModule
from train import main

pytestmark = pytest.mark.faults

QUIET = ["--training.report=false", "--training.preflight=false"]
STEPS_PER_EPOCH = 18  # 144 training days of the tiny market, 8 days per batch
TESTS = Path(__file__).resolve().parent



def fit(market, run_dir, max_epochs, *extra):
    torch.set_num_threads(1)
    return main(fit_args(market, run_dir, max_epochs, [*QUIET, *extra]))


def temporary_files(folder) -> list:
    return [path.name for path in folder.iterdir() if path.name.endswith(TEMPORARY_SUFFIX)]


class InjectedFault(RuntimeError):
    pass


@pytest.mark.parametrize(("step", "stage", "file_name", "batch", "global_step"), [
    ("training_step", "train", "epoch_1_error.pth", 4, STEPS_PER_EPOCH + 4),
    ("validation_step", "val", "epoch_1_val_error.pth", 2, 2 * STEPS_PER_EPOCH),
], ids=["train", "val"])
def test_a_raising_step_leaves_an_error_file_and_the_exception_goes_on(
        tiny_market, tmp_path, monkeypatch, step, stage, file_name, batch, global_step):
    original = getattr(GatedGNNModule, step)

    def failing_step(self, data, batch_idx):
        if self.current_epoch == 1 and batch_idx == batch and not self.trainer.sanity_checking:
            raise InjectedFault(f"injected {stage} failure")
        return original(self, data, batch_idx)

    monkeypatch.setattr(GatedGNNModule, step, failing_step)
    with pytest.raises(InjectedFault, match=f"injected {stage} failure") as raised:
        fit(tiny_market, tmp_path, 3)

    # The original exception, with its own traceback, reached the caller.
    assert "failing_step" in "".join(traceback.format_tb(raised.value.__traceback__))
    folder = tmp_path / "checkpoints"
    assert names(folder) == sorted(["best_model.pth", "epoch_0.pth", file_name])
    checkpoint = load(folder / file_name)
    info = checkpoint["error_info"]
    assert info["type"] == "InjectedFault" and info["message"] == f"injected {stage} failure"
    assert info["stage"] == stage and info["epoch"] == checkpoint["epoch"] == 1
    assert info["batch_index"] == batch and info["global_step"] == global_step
    assert "failing_step" in info["traceback"] and "InjectedFault" in info["traceback"]
    assert all(bool(torch.isfinite(tensor).all())
               for tensor in checkpoint["model_state_dict"].values())
    assert {"state_dict", "loops", "optimizer_states"} <= set(checkpoint)


def test_nan_loss_leaves_a_nan_file_with_finite_weights_outside_the_rotation(
        tiny_market, tmp_path, monkeypatch):
    original = GatedGNNModule.training_step
    refused = []

    def nan_step(self, data, batch_idx):
        if self.current_epoch == 2 and batch_idx == 0:
            manager = next(callback for callback in self.trainer.callbacks
                           if isinstance(callback, CheckpointManager))
            weight = self.model.head[3].weight
            kept = weight.detach().clone()
            with torch.no_grad():
                weight.fill_(math.nan)
            refused.append(manager.save_nan_checkpoint(self.trainer, self, {"step": "test"}))
            with torch.no_grad():
                weight.copy_(kept)
        output = original(self, data, batch_idx)
        if self.current_epoch == 1 and batch_idx == 3:
            output["loss"] = output["loss"] * math.nan
        return output

    monkeypatch.setattr(GatedGNNModule, "training_step", nan_step)
    cli = fit(tiny_market, tmp_path, 4, "--training.keep_last=2", "--training.nan_policy=skip")

    folder = tmp_path / "checkpoints"
    assert refused == [None]  # NaN weights are never written
    assert names(folder) == ["best_model.pth", "epoch_1_nan.pth", "epoch_2.pth", "epoch_3.pth"]
    checkpoint = load(folder / "epoch_1_nan.pth")
    assert checkpoint["epoch"] == 1
    assert checkpoint["nan_info"]["global_step"] == checkpoint["global_step"] == \
        STEPS_PER_EPOCH + 3
    assert checkpoint["nan_info"]["batch_idx"] == 3
    assert all(bool(torch.isfinite(tensor).all())
               for tensor in checkpoint["model_state_dict"].values())
    manager = next(cb for cb in cli.trainer.callbacks if isinstance(cb, CheckpointManager))
    assert manager.newest_epoch_checkpoint() == folder / "epoch_3.pth"
    assert "nan_info" not in load(folder / "best_model.pth")


def test_a_full_disk_skips_saves_and_training_goes_on(tiny_market, tmp_path, monkeypatch,
                                                      caplog):
    failing_epochs = {1, 2}
    real_save = torch.save

    def save_until_disk_full(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") in failing_epochs \
                and "model_state_dict" in obj:
            handle.write(b"\0" * 4096)  # part of the file is on disk when the space runs out
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with caplog.at_level(logging.WARNING, logger="callbacks.checkpoint"):
        cli = fit(tiny_market, tmp_path, 5, "--training.keep_last=2")

    assert cli.trainer.current_epoch == 5
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["best_model.pth", "epoch_3.pth", "epoch_4.pth"]
    warnings = [record.getMessage() for record in caplog.records
                if record.getMessage().startswith("Could not save")]
    assert any("epoch_1.pth" in text and "No space left on device" in text and " free in " in text
               for text in warnings)
    history = load(folder / "epoch_4.pth")["val_history"]["accuracy"]
    best_written = None
    for epoch, accuracy in enumerate(history):
        if epoch not in failing_epochs and (best_written is None
                                            or accuracy > history[best_written]):
            best_written = epoch
    best = load(folder / "best_model.pth")
    assert best["epoch"] == best_written and best["best"]["epoch"] == best_written
    assert load(folder / "epoch_4.pth")["callbacks"]["CheckpointManager"]["rotation"] == \
        ["epoch_3.pth", "epoch_4.pth"]


CHILD_PRELUDE = f"""
import sys
sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]
import torch
from conftest import fit_args, load, names
from train import main
torch.set_num_threads(1)
"""


def run_child(code: str, log_file: Path) -> subprocess.Popen:
    """``code`` in a fresh interpreter; its output goes to ``log_file`` (a pipe could fill up
    and block the child while the test waits for it)."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with open(log_file, "w") as output:
        return subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + code], env=env,
                                stdout=output, stderr=subprocess.STDOUT)


def test_a_file_size_limit_fails_saves_cleanly_and_training_finishes(tiny_market, tmp_path):
    child = run_child(f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
limit = 64 * 1024  # logs fit, a checkpoint (about 130 KB) does not
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
cli = main(fit_args({str(tiny_market)!r}, {str(tmp_path)!r}, 3, {QUIET!r}))
print("finished epochs:", cli.trainer.current_epoch)
""", tmp_path / "child.log")
    child.wait(timeout=300)
    output = (tmp_path / "child.log").read_text()

    assert child.returncode == 0, output
    assert "finished epochs: 3" in output
    assert "File too large" in output and "Could not save" in output
    folder = tmp_path / "checkpoints"
    assert not folder.exists() or names(folder) == []


def test_kill_during_a_save_then_resume_from_last(tiny_market, tmp_path):
    marker = tmp_path / "writing"
    child = run_child(f"""
import os, time, io
from pathlib import Path
real_save = torch.save

def stalled_save(obj, handle, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 3 and "model_state_dict" in obj:
        buffer = io.BytesIO()
        real_save(obj, buffer)
        handle.write(buffer.getvalue()[: buffer.tell() // 2])
        handle.flush()
        Path({str(marker)!r}).touch()
        time.sleep(600)  # killed here, half written
    return real_save(obj, handle, *args, **kwargs)

torch.save = stalled_save
main(fit_args({str(tiny_market)!r}, {str(tmp_path)!r}, 6, {QUIET!r}))
""", tmp_path / "child.log")
    deadline = time.monotonic() + 300
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not marker.exists():
        child.kill()
        child.wait()
        pytest.fail("the child never reached the epoch-3 save:\n"
                    + (tmp_path / "child.log").read_text()[-3000:])
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=60) == -signal.SIGKILL

    folder = tmp_path / "checkpoints"
    assert len(temporary_files(folder)) == 1  # the torn write, under a temporary name only
    for name in names(folder):
        if name.endswith(".pth"):
            assert load(folder / name)["epoch"] <= 2, name
    assert "epoch_3.pth" not in names(folder)

    cli = fit(tiny_market, tmp_path, 6, "--ckpt_path=last")

    assert cli.trainer.ckpt_path == str(folder / "epoch_2.pth")
    assert temporary_files(folder) == []
    # Five newest of this run, plus the file it resumed from, which is never pruned.
    assert names(folder) == ["best_model.pth"] + [f"epoch_{n}.pth" for n in range(6)]
    assert load(folder / "epoch_5.pth")["train_history"]["epoch"] == list(range(6))


def test_ckpt_path_last_skips_a_damaged_newest_file(tiny_market, tmp_path):
    fit(tiny_market, tmp_path, 3)
    folder = tmp_path / "checkpoints"
    newest = folder / "epoch_2.pth"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])

    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*epoch_2\.pth"):
        cli = fit(tiny_market, tmp_path, 4, "--ckpt_path=last")

    assert cli.trainer.ckpt_path == str(folder / "epoch_1.pth")
    assert names(folder) == ["best_model.pth", "epoch_0.pth", "epoch_1.pth", "epoch_2.pth",
                             "epoch_2.pth.damaged", "epoch_3.pth"]
    assert (folder / "epoch_2.pth.damaged").read_bytes() == data[: len(data) // 3]
    assert load(folder / "epoch_3.pth")["train_history"]["epoch"] == [0, 1, 2, 3]


def test_an_unloadable_payload_value_is_named_before_it_breaks_a_resume():
    from callbacks.checkpoint_state import unloadable_values

    found = unloadable_values({"hyper_parameters": {"path": Path("x"), "ok": [1, 2.0, "a"]},
                               "state": {"w": torch.zeros(2)}, "buffer": io.BytesIO()})
    assert found == ["hyper_parameters.path: pathlib.PosixPath", "buffer: _io.BytesIO"]
