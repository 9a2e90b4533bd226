"""Preemption: SIGTERM or SIGUSR1 saves at the next step boundary, exits with 75, and a resume from
``last`` continues with the next batch as if nothing had happened."""

import contextlib
import errno
import io
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import fit_args, load, names, write_tiny_market

import callbacks.checkpoint as checkpoint_module
import ckpt
from callbacks.checkpoint_files import classify, progress_key
from callbacks.preemption import PREEMPTED_EXIT_CODE
from callbacks.resume import resume_candidates
from lit_models.lit_gated_gnn import GatedGNNModule
from train import main

QUIET = ["--training.report=false", "--training.preflight=false", "--trainer.deterministic=true"]
EPOCHS = 3
STEPS_PER_EPOCH = 18
SIGNAL_AT = (1, 5)  # (epoch, batch): the signal arrives while this batch trains



@contextlib.contextmanager
def recording(batches: list, signal_at=None, signum=signal.SIGTERM):
    """Record every training batch as (epoch, batch index, (day, nodes) per sample); send
    ``signum`` to this process when batch ``signal_at`` starts."""
    def on_train_batch_start(self, batch, batch_idx):
        batches.append((self.current_epoch, batch_idx,
                        tuple((int(day["day"]), tuple(day["node_index"].tolist()))
                              for day in batch)))
        if (self.current_epoch, batch_idx) == signal_at:
            os.kill(os.getpid(), signum)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GatedGNNModule, "on_train_batch_start", on_train_batch_start)
        yield


def fit(market, run_dir, *extra, batches=None, signal_at=None, signum=signal.SIGTERM):
    """Fit in this process; returns the exit code (0, or that of the SystemExit raised)."""
    torch.set_num_threads(1)
    with recording(batches if batches is not None else [], signal_at, signum):
        try:
            main(fit_args(market, run_dir, EPOCHS, [*QUIET, *extra]))
        except SystemExit as stop:
            return stop.code
    return 0


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return write_tiny_market(tmp_path_factory.mktemp("market"))


@pytest.fixture(scope="module")
def whole(market, tmp_path_factory):
    """An uninterrupted deterministic fit, with the batches it trained on."""
    run_dir, batches = tmp_path_factory.mktemp("whole"), []
    assert fit(market, run_dir, batches=batches) == 0
    return SimpleNamespace(folder=run_dir / "checkpoints", batches=batches)


@pytest.fixture(scope="module")
def preempted(market, tmp_path_factory):
    """SIGTERM inside epoch 1, then ``--ckpt_path last``."""
    run_dir, before, after = tmp_path_factory.mktemp("preempted"), [], []
    folder = run_dir / "checkpoints"
    handler_before = signal.getsignal(signal.SIGTERM)
    exit_code = fit(market, run_dir, batches=before, signal_at=SIGNAL_AT)
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        ckpt.main(["list", str(folder)])
        ckpt.main(["show", str(folder / "epoch_1_preempt.pth")])
    stopped = SimpleNamespace(exit_code=exit_code, files=names(folder), listing=listing.getvalue(),
                              checkpoint=load(folder / "epoch_1_preempt.pth"),
                              handler_after=signal.getsignal(signal.SIGTERM))
    resumed_code = fit(market, run_dir, "--ckpt_path=last", batches=after)
    return SimpleNamespace(folder=folder, stopped=stopped, handler_before=handler_before,
                           before=before, after=after, resumed_code=resumed_code)


def test_sigterm_saves_a_preemption_file_at_the_step_boundary_and_exits_75(preempted):
    stopped = preempted.stopped
    assert stopped.exit_code == PREEMPTED_EXIT_CODE == 75
    assert stopped.files == ["best_model.pth", "epoch_0.pth", "epoch_1_preempt.pth"]
    epoch, batch = SIGNAL_AT
    info = stopped.checkpoint["preempt_info"]
    assert info == {"signal": "SIGTERM", "epoch": epoch, "global_step":
                    epoch * STEPS_PER_EPOCH + batch + 1, "batch_index": batch,
                    "at_epoch_end": False, "world_size": 1}
    assert stopped.checkpoint["global_step"] == info["global_step"]
    assert stopped.checkpoint["epoch"] == epoch
    # The batch that was training when the signal came finished; nothing after it started.
    assert preempted.before[-1][:2] == SIGNAL_AT


def test_the_preemption_file_holds_the_sampler_position_and_the_last_complete_epoch(preempted):
    state = preempted.stopped.checkpoint["callbacks"]["CheckpointManager"]
    epoch, batch = SIGNAL_AT
    assert state["sampler"] == {"seed": 42, "num_samples": 144, "shuffle": True, "epoch": epoch,
                                "consumed": (batch + 1) * 8, "world_size": 1,
                                "batches": batch + 1}
    assert state["epoch"] == epoch - 1 and state["history"]["train"]["epoch"] == [0]
    assert preempted.stopped.checkpoint["train_history"]["epoch"] == [0]


def test_ckpt_list_and_show_know_the_preemption_file(preempted):
    lines = preempted.stopped.listing.splitlines()
    row = next(line for line in lines if line.startswith("epoch_1_preempt.pth"))
    assert row.split()[1:3] == ["preempt", "1"] and "damaged" not in row
    assert "preempt_info:" in lines and "  signal: SIGTERM" in lines, lines


def test_lightning_gets_its_signal_handlers_back_after_fit(preempted):
    assert preempted.stopped.handler_after == preempted.handler_before


def test_a_resume_from_last_continues_with_the_next_batch(preempted, whole):
    assert preempted.resumed_code == 0
    assert preempted.after[0][:2] == (SIGNAL_AT[0], SIGNAL_AT[1] + 1)
    assert preempted.before + preempted.after == whole.batches


def test_the_resumed_run_ends_with_the_uninterrupted_weights_and_optimizer(preempted, whole):
    expected, resumed = load(whole.folder / "epoch_2.pth"), load(preempted.folder / "epoch_2.pth")
    for name, tensor in expected["model_state_dict"].items():
        assert torch.equal(tensor, resumed["model_state_dict"][name]), name
    for index, state in expected["optimizer_state_dict"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], resumed["optimizer_state_dict"]["state"][index][key])
    assert resumed["scheduler_state_dict"] == expected["scheduler_state_dict"]
    assert resumed["global_step"] == expected["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert resumed["val_history"] == expected["val_history"]
    # The interrupted epoch's learning rate is recorded although it resumed mid-epoch.
    assert resumed["train_history"]["lr"] == expected["train_history"]["lr"]


@pytest.mark.xfail(strict=True, reason=(
    "TODO(partial-epoch metrics): the epoch-mean train_loss, train accuracy and gate statistics "
    "are accumulated by Lightning and torchmetrics outside any saved state, so the interrupted "
    "epoch's means cover only the batches after the resume"))
def test_the_interrupted_epochs_training_metrics_equal_the_uninterrupted_ones(preempted, whole):
    expected, resumed = load(whole.folder / "epoch_2.pth"), load(preempted.folder / "epoch_2.pth")
    assert resumed["train_history"]["loss"] == expected["train_history"]["loss"]


def test_a_later_epoch_file_supersedes_the_preemption_file(preempted):
    assert names(preempted.folder) == ["best_model.pth", "epoch_0.pth", "epoch_1.pth",
                                       "epoch_2.pth"]


def test_sigusr1_in_the_last_batch_of_an_epoch_stops_after_its_files(market, whole, tmp_path):
    last_batch = (1, STEPS_PER_EPOCH - 1)
    before, after = [], []
    code = fit(market, tmp_path, batches=before, signal_at=last_batch, signum=signal.SIGUSR1)

    folder = tmp_path / "checkpoints"
    assert code == PREEMPTED_EXIT_CODE
    assert names(folder) == ["best_model.pth", "epoch_0.pth", "epoch_1.pth"]
    expected = load(whole.folder / "epoch_2.pth")["val_history"]
    assert load(folder / "epoch_1.pth")["val_history"] == \
        {key: values[:2] for key, values in expected.items()}
    assert fit(market, tmp_path, "--ckpt_path=last", batches=after) == 0
    assert before + after == whole.batches


def test_an_epoch_file_that_cannot_be_written_leaves_an_epoch_end_preemption_file(
        market, whole, tmp_path, monkeypatch):
    real_save = checkpoint_module.atomic_save

    def no_epoch_1_file(payload, path):
        if Path(path).name == "epoch_1.pth":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(payload, path)

    monkeypatch.setattr(checkpoint_module, "atomic_save", no_epoch_1_file)
    code = fit(market, tmp_path, signal_at=(1, STEPS_PER_EPOCH - 1))
    monkeypatch.setattr(checkpoint_module, "atomic_save", real_save)

    folder = tmp_path / "checkpoints"
    assert code == PREEMPTED_EXIT_CODE
    assert names(folder) == ["best_model.pth", "epoch_0.pth", "epoch_1_preempt.pth"]
    preempt = load(folder / "epoch_1_preempt.pth")
    assert preempt["preempt_info"]["at_epoch_end"] is True
    assert preempt["callbacks"]["CheckpointManager"]["sampler"] is None
    assert preempt["train_history"]["epoch"] == [0, 1]

    assert fit(market, tmp_path, "--ckpt_path=last") == 0
    expected, resumed = load(whole.folder / "epoch_2.pth"), load(folder / "epoch_2.pth")
    assert resumed["train_history"] == expected["train_history"]
    for name, tensor in expected["model_state_dict"].items():
        assert torch.equal(tensor, resumed["model_state_dict"][name]), name


def test_last_skips_a_damaged_preemption_file_for_the_newest_epoch_file(market, tmp_path):
    assert fit(market, tmp_path, signal_at=SIGNAL_AT) == PREEMPTED_EXIT_CODE
    folder = tmp_path / "checkpoints"
    preempt = folder / "epoch_1_preempt.pth"
    preempt.write_bytes(preempt.read_bytes()[:5000])

    with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*epoch_1_preempt\.pth"):
        assert fit(market, tmp_path, "--ckpt_path=last") == 0
    assert load(folder / "epoch_2.pth")["train_history"]["epoch"] == [0, 1, 2]


def test_last_orders_files_by_training_progress(tmp_path):
    def write(name, epoch):
        torch.save({"epoch": epoch}, tmp_path / name)

    write("epoch_3.pth", 3)
    write("epoch_4_preempt.pth", 4)
    write("epoch_2_preempt.pth", 2)
    write("epoch_4_error.pth", 4)
    write("best_model.pth", 3)
    assert [path.name for path in resume_candidates(tmp_path)] == \
        ["epoch_4_preempt.pth", "epoch_3.pth", "epoch_2_preempt.pth"]
    write("best_model.pth", 5)  # written just before an epoch_5.pth that never came
    assert resume_candidates(tmp_path)[0].name == "best_model.pth"
    assert classify("epoch_4_preempt.pth") == ("preempt", 4)
    assert progress_key("epoch_4_preempt.pth") < progress_key("epoch_4.pth") \
        < progress_key("epoch_5_preempt.pth")


def test_slurms_requeue_signal_requeues_the_job_and_sigterm_does_not(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    import callbacks.preemption as preemption

    commands = []
    monkeypatch.setattr(preemption.subprocess, "run",
                        lambda command, **_: commands.append(command)
                        or SimpleNamespace(returncode=0))
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    trainer = SimpleNamespace(_accelerator_connector=SimpleNamespace(
        cluster_environment=SLURMEnvironment()))

    preemption._requeue_slurm_job(trainer, signal.SIGTERM)  # may be scancel: never requeue
    assert commands == []
    preemption._requeue_slurm_job(trainer, signal.SIGUSR1)
    assert commands == [["scontrol", "requeue", "1234"]]
