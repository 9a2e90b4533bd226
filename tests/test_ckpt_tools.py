"""The checkpoint commands of ``ckpt.py`` on a hand-made run folder and on a real short fit.

The hand-made folder holds what the checkpoint callback writes (epoch, best, error, NaN files)
plus a backup, a truncated file, a text file and a pickle that would run code if it were
unpickled without ``weights_only``.
"""

import math
import pickle
import struct
from pathlib import Path

import pytest
import torch
from conftest import fit_args, write_tiny_market

import ckpt
from callbacks.checkpoint_io import atomic_save
from callbacks.checkpoint_summary import load_checkpoint, summarize, summarize_folder
from callbacks.plots import curves_from_summaries

NUM_EPOCHS = 8
BEST_EPOCH = 5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_checkpoint(epoch: int, nan_weights: bool = False) -> dict:
    """What the checkpoint callback writes after ``epoch`` (a small model stands in)."""
    model = torch.nn.Linear(4, 3)
    state = model.state_dict()
    if nan_weights:
        state["weight"][0, 0] = math.nan
    epochs = range(epoch + 1)
    val_accuracy = [0.20 + 0.01 * e if e <= BEST_EPOCH else 0.24 for e in epochs]
    return {
        "epoch": epoch,
        "model_state_dict": state,
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "scheduler_state_dict": None,
        "train_loss": 1.60 - 0.02 * epoch,
        "train_accuracy": 0.21 + 0.01 * epoch,
        "val_loss": 1.61 - 0.01 * epoch,
        "val_accuracy": val_accuracy[-1],
        "train_history": {"loss": [1.60 - 0.02 * e for e in epochs],
                          "accuracy": [0.21 + 0.01 * e for e in epochs],
                          "lr": [1e-3 * 0.9 ** e for e in epochs]},
        "val_history": {"loss": [1.61 - 0.01 * e for e in epochs],
                        "accuracy": val_accuracy,
                        "IC": [0.01 * e for e in epochs],
                        "RankIC": [0.012 * e for e in epochs],
                        "gate_mean": [0.5 + 0.01 * e for e in epochs]},
        "best_val_acc": max(val_accuracy),
        "val_IC": 0.01 * epoch,
        "val_RankIC": 0.012 * epoch,
        "gate_mean": 0.5 + 0.01 * epoch,
        "gate_std": 0.05,
    }


def write_fake_run(folder: Path) -> Path:
    """Epoch files 0..7, best (epoch 5), an error file, a NaN file and a backup."""
    for epoch in range(NUM_EPOCHS):
        atomic_save(fake_checkpoint(epoch), folder / f"epoch_{epoch}.pth")
    atomic_save(fake_checkpoint(BEST_EPOCH), folder / "best_model.pth")
    error = fake_checkpoint(3)
    error["error_info"] = {"type": "RuntimeError", "module": "builtins",
                           "message": "CUDA out of memory", "stage": "train", "epoch": 3,
                           "global_step": 41, "batch_index": 7,
                           "traceback": "Traceback (most recent call last):\n  boom"}
    atomic_save(error, folder / "epoch_3_error.pth")
    nan = fake_checkpoint(6)
    nan["nan_info"] = {"warning": "⚠ Warning: NaN/Inf detected in training loss", "epoch": 6,
                       "global_step": 55, "batch_idx": 2, "non_finite": "loss",
                       "non_finite_inputs": [], "policy": "skip"}
    atomic_save(nan, folder / "epoch_6_nan.pth")
    atomic_save(fake_checkpoint(2), folder / "backup_old.pth")
    return folder


class _RunsCode:
    """Unpickling this without ``weights_only`` would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def add_bad_files(folder: Path, marker: Path) -> dict:
    """A truncated epoch file, a hostile pickle (old format and torch zip format), a text file,
    a tensor that is not a dict, and a best file with NaN weights, under checkpoint names."""
    whole = (folder / "epoch_7.pth").read_bytes()
    (folder / "epoch_8.pth").write_bytes(whole[: len(whole) // 2])
    (folder / "epoch_9.pth").write_bytes(pickle.dumps({"epoch": _RunsCode(marker)}))
    torch.save({"epoch": 10, "payload": _RunsCode(marker)}, folder / "backup_evil.pth")
    (folder / "notes.pth").write_text("not a checkpoint\n")
    torch.save(torch.zeros(3), folder / "backup_tensor.pth")
    atomic_save(fake_checkpoint(4, nan_weights=True), folder / "backup_nan_weights.pth")
    return {"epoch_8.pth": "truncated", "epoch_9.pth": "refused", "backup_evil.pth": "refused",
            "notes.pth": "not a torch checkpoint", "backup_tensor.pth": "not a dict",
            "backup_nan_weights.pth": "non-finite"}


@pytest.fixture
def fake_run(tmp_path) -> Path:
    return write_fake_run(tmp_path / "checkpoints")


@pytest.fixture
def broken_run(fake_run, tmp_path):
    marker = tmp_path / "code_ran"
    return fake_run, add_bad_files(fake_run, marker), marker


def run(capsys, *argv) -> tuple:
    status = ckpt.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def rows_by_file(out: str) -> dict:
    lines = out.splitlines()
    return {line.split()[0]: line for line in lines[2:] if line and not line.startswith("damaged")}


# -- list ---------------------------------------------------------------------------------------

def test_list_shows_one_row_per_file_with_metrics_and_best_mark(fake_run, capsys):
    status, out, _ = run(capsys, "list", fake_run)

    assert status == 0
    rows = rows_by_file(out)
    assert len(rows) == NUM_EPOCHS + 4
    assert rows["epoch_4.pth"].split()[1:8] == ["epoch", "4", "1.5200", "1.5700", "24.00%",
                                                 "+0.0400", "+0.0480"]
    assert "★" in rows["best_model.pth"] and "★" in rows["epoch_5.pth"]
    assert "★" not in rows["epoch_4.pth"] and "★" not in rows["epoch_6.pth"]
    assert rows["epoch_3_error.pth"].split()[1] == "error"
    assert rows["epoch_6_nan.pth"].split()[1] == "nan"
    assert rows["backup_old.pth"].split()[1] == "backup"
    assert all(row.endswith("ok") for row in rows.values())


def test_list_marks_damaged_and_foreign_files_without_running_them(broken_run, capsys):
    folder, bad, marker = broken_run

    status, out, _ = run(capsys, "list", folder)

    assert status == 1  # the README's exit status: 1 when any file is damaged
    rows = rows_by_file(out)
    for name in bad:
        assert rows[name].endswith("damaged"), name
        assert f"damaged: {name}: " in out
    assert rows["epoch_7.pth"].endswith("ok")
    assert not marker.exists()


# -- show ---------------------------------------------------------------------------------------

def test_show_prints_the_progress_in_percent(fake_run, capsys):
    status, out, _ = run(capsys, "show", fake_run / "epoch_4.pth")

    assert status == 0
    assert "Epoch:              4" in out
    assert "Train loss:         1.5200" in out
    assert "Train accuracy:     25.00%" in out
    assert "Val loss:           1.5700" in out
    assert "Val accuracy:       24.00%" in out
    assert "Best val accuracy:  24.00%" in out
    assert "Val IC / RankIC:    +0.0400 / +0.0480" in out


def test_show_prints_error_and_nan_information(fake_run, capsys):
    _, error_out, _ = run(capsys, "show", fake_run / "epoch_3_error.pth")
    _, nan_out, _ = run(capsys, "show", fake_run / "epoch_6_nan.pth")

    assert "error_info:" in error_out
    assert "  type: RuntimeError" in error_out and "  message: CUDA out of memory" in error_out
    assert "  global_step: 41" in error_out and "  batch_index: 7" in error_out
    assert "    Traceback (most recent call last):" in error_out
    assert "nan_info:" in nan_out
    assert "  warning: ⚠ Warning: NaN/Inf detected in training loss" in nan_out
    assert "  global_step: 55" in nan_out and "  non_finite: loss" in nan_out


def test_show_reports_a_damaged_file_with_exit_one(broken_run, capsys):
    folder, _, marker = broken_run

    status, out, _ = run(capsys, "show", folder / "epoch_9.pth")

    assert status == 1
    assert "damaged: refused" in out
    assert not marker.exists()


# -- verify -------------------------------------------------------------------------------------

def test_verify_passes_a_sound_folder(fake_run, capsys):
    status, out, _ = run(capsys, "verify", fake_run)

    assert status == 0
    assert out.splitlines()[-1] == f"{NUM_EPOCHS + 4} ok, 0 damaged"


def test_verify_names_every_damaged_file_and_exits_one(broken_run, capsys):
    folder, bad, marker = broken_run

    status, out, _ = run(capsys, "verify", folder)

    assert status == 1
    lines = {line.split()[1]: line for line in out.splitlines()[:-1]}
    for name, reason in bad.items():
        assert lines[name].startswith("✘") and reason in lines[name], lines[name]
    assert lines["epoch_7.pth"].startswith("✔")
    assert out.splitlines()[-1] == f"{NUM_EPOCHS + 4} ok, {len(bad)} damaged"
    assert not marker.exists()


def test_verify_single_file_and_empty_folder(fake_run, tmp_path, capsys):
    assert run(capsys, "verify", fake_run / "best_model.pth")[0] == 0
    (tmp_path / "empty").mkdir()
    assert run(capsys, "verify", tmp_path / "empty")[0] == 1
    assert run(capsys, "verify", tmp_path / "missing")[0] == 2


def test_hostile_zip_checkpoint_is_refused_by_the_loader(broken_run):
    folder, _, marker = broken_run

    summary = summarize(folder / "backup_evil.pth")

    assert not summary.ok and "refused" in summary.problem
    assert not marker.exists()


# -- backup -------------------------------------------------------------------------------------

def test_backup_is_a_byte_identical_copy(fake_run, capsys):
    status, out, _ = run(capsys, "backup", fake_run / "best_model.pth", "--name", "before_lr")

    target = fake_run / "backup_before_lr.pth"
    assert status == 0 and str(target) in out
    assert target.read_bytes() == (fake_run / "best_model.pth").read_bytes()
    assert load_checkpoint(target)["epoch"] == BEST_EPOCH
    assert not list(fake_run.glob("*.tmp"))


def test_backup_default_name_carries_the_epoch_and_never_overwrites(fake_run, capsys):
    assert run(capsys, "backup", fake_run / "best_model.pth")[0] == 0
    target = fake_run / f"backup_best_model_epoch{BEST_EPOCH}.pth"
    assert target.is_file()

    assert run(capsys, "backup", fake_run / "best_model.pth")[1].startswith("Already backed up")
    status, _, err = run(capsys, "backup", fake_run / "epoch_7.pth", "--name",
                         f"best_model_epoch{BEST_EPOCH}")
    assert status == 1 and "--force" in err
    assert load_checkpoint(target)["epoch"] == BEST_EPOCH


def test_backup_refuses_a_damaged_file_and_a_bad_name(broken_run, capsys):
    folder, _, _ = broken_run

    assert run(capsys, "backup", folder / "epoch_8.pth")[0] == 1
    assert not (folder / "backup_epoch_8.pth").exists()
    assert run(capsys, "backup", folder / "epoch_7.pth", "--name", "../escape")[0] == 2


# -- prune --------------------------------------------------------------------------------------

def test_prune_keeps_the_five_newest_and_every_other_kind(fake_run, capsys):
    before = {path.name for path in fake_run.iterdir()}

    status, out, _ = run(capsys, "prune", fake_run, "--keep", "5")

    after = {path.name for path in fake_run.iterdir()}
    assert status == 0
    assert before - after == {"epoch_0.pth", "epoch_1.pth", "epoch_2.pth"}
    assert {"best_model.pth", "epoch_3_error.pth", "epoch_6_nan.pth", "backup_old.pth",
            "epoch_3.pth", "epoch_7.pth"} <= after
    assert "Deleted 3 file(s)" in out


def test_prune_never_lets_damaged_files_or_folders_push_good_checkpoints_out(fake_run, capsys):
    (fake_run / "epoch_9.pth").write_bytes(b"half a checkpoint")  # newest by number, damaged
    (fake_run / "epoch_8.pth").mkdir()  # not even a file
    (fake_run / "notes.txt").write_text("not mine")
    (fake_run / "epoch_10.pth").symlink_to(fake_run / "notes.txt")

    status, out, _ = run(capsys, "prune", fake_run, "--keep", "2")

    assert status == 0
    after = {path.name for path in fake_run.iterdir()}
    # The two newest loadable epoch files stay; the damaged ones are left alone, not counted.
    assert {"epoch_6.pth", "epoch_7.pth", "epoch_8.pth", "epoch_9.pth", "epoch_10.pth",
            "notes.txt"} <= after
    assert not {"epoch_0.pth", "epoch_5.pth"} & after
    assert "Left alone (not a loadable checkpoint)" in out and "Deleted 6 file(s)" in out


def test_prune_dry_run_deletes_nothing(fake_run, capsys):
    before = sorted(fake_run.iterdir())

    status, out, _ = run(capsys, "prune", fake_run, "--keep", "2", "--dry-run")

    assert status == 0 and "Would delete 6 file(s)" in out
    assert sorted(fake_run.iterdir()) == before


# -- plot ---------------------------------------------------------------------------------------

def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


def test_plot_folder_writes_a_png_of_sensible_size(broken_run, tmp_path, capsys):
    folder, _, marker = broken_run
    out = tmp_path / "curves.png"

    status, printed, _ = run(capsys, "plot", folder, "--out", out)

    assert status == 0 and str(out) in printed
    width, height = png_size(out)
    assert (width, height) == (1500, 850)
    assert out.stat().st_size > 30_000
    assert not marker.exists()


def test_plot_single_file_defaults_to_its_folder(fake_run, capsys):
    assert run(capsys, "plot", fake_run / "epoch_6.pth")[0] == 0
    assert png_size(fake_run / "curves.png") == (1500, 850)


def test_curves_come_from_the_longest_history(fake_run):
    curves = curves_from_summaries(summarize_folder(fake_run))

    epochs, values = curves.get("val_accuracy")
    assert epochs == list(range(NUM_EPOCHS))
    assert values[BEST_EPOCH] == pytest.approx(0.25)
    assert curves.best_epoch == BEST_EPOCH
    assert curves.get("lr")[1][0] == pytest.approx(1e-3)
    assert curves.get("val_gate_mean")[1][-1] == pytest.approx(0.57)


def test_plot_of_a_folder_without_checkpoints_fails_cleanly(tmp_path, capsys):
    status, _, err = run(capsys, "plot", tmp_path)

    assert status == 1 and "Nothing to plot" in err


# -- on a real fit ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A 3-epoch fit with the report on: its checkpoint folder and the LightningCLI."""
    from train import main

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real")
    market = write_tiny_market(root / "market")
    cli = main(fit_args(market, root / "run", max_epochs=3,
                        extra=["--training.keep_last=2"]))
    folder = Path(cli.config_init["fit"]["training"].save_dir)
    if not any(type(cb).__name__ == "CheckpointManager" for cb in cli.trainer.callbacks):
        pytest.skip("this tree's fit has no checkpoint callback yet")
    return folder, cli


def test_real_fit_files_list_show_and_verify(real_run, capsys):
    folder, _ = real_run

    assert run(capsys, "verify", folder)[1].splitlines()[-1] == "3 ok, 0 damaged"
    status, out, _ = run(capsys, "list", folder)
    rows = rows_by_file(out)
    assert status == 0 and set(rows) == {"epoch_1.pth", "epoch_2.pth", "best_model.pth"}
    assert "★" in rows["best_model.pth"]
    newest = load_checkpoint(folder / "epoch_2.pth")
    assert f"{100 * newest['val_accuracy']:.2f}%" in rows["epoch_2.pth"]
    status, out, _ = run(capsys, "show", folder / "epoch_2.pth")
    assert status == 0 and "Epoch:              2" in out
    assert f"Train loss:         {newest['train_loss']:.4f}" in out
    assert f"Best val accuracy:  {100 * newest['best_val_acc']:.2f}%" in out


def test_real_fit_damaged_copy_backup_and_plot(real_run, tmp_path, capsys):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(real_run[0], folder)
    whole = (folder / "epoch_2.pth").read_bytes()
    (folder / "epoch_9.pth").write_bytes(whole[:1000])

    status, out, _ = run(capsys, "verify", folder)
    assert status == 1 and "✘ epoch_9.pth" in out and "truncated" in out
    assert run(capsys, "backup", folder / "best_model.pth", "--name", "keep")[0] == 0
    assert (folder / "backup_keep.pth").read_bytes() == (folder / "best_model.pth").read_bytes()
    assert run(capsys, "plot", folder, "--out", tmp_path / "c.png")[0] == 0
    assert png_size(tmp_path / "c.png") == (1500, 850)


def test_real_fit_report_writes_curves_and_names_the_best_model(real_run):
    from callbacks.fit_report import FitReport

    folder, cli = real_run
    report = next(cb for cb in cli.trainer.callbacks if isinstance(cb, FitReport))

    text = "\n".join(report.lines)
    assert text.startswith(f"After-fit report: {folder}")
    assert "3 checkpoint file(s) (2 epoch, 1 best); 3 written by this run; 3 verified ok" in text
    assert f"Best model: {folder / 'best_model.pth'} (epoch " in text
    assert "Alerts: " in text and "Disk: " in text
    assert f"python ckpt.py backup {folder / 'best_model.pth'} --name best_epoch" in text
    assert png_size(folder / "curves.png") == (1500, 850)
