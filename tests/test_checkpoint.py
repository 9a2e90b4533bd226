"""Checkpoint files of a fit: rotation, best model, keys, sizes, resume, the user's snippets."""

import io
import math
import shutil
import warnings

import pytest
import torch
from conftest import fit_args, load, names, write_tiny_market

from callbacks.checkpoint import ForeignCheckpointError
from lit_models.gated_gnn import GatedGraphNet
from train import main

# Other engineers' after-fit report and preflight are tested elsewhere; they only slow these fits.
QUIET = ["--training.report=false", "--training.preflight=false", "--trainer.deterministic=true"]
USER_FLOAT_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_IC",
                   "val_RankIC", "gate_mean", "gate_std", "best_val_acc")
TRAIN_HISTORY_KEYS = {"epoch", "loss", "accuracy", "lr", "gate_mean", "gate_std",
                      "favor_time_ratio"}
VAL_HISTORY_KEYS = {"epoch", "loss", "accuracy", "IC", "RankIC", "ICIR", "RankICIR",
                    "gate_mean", "gate_std", "favor_time_ratio"}



def fit(market, run_dir, max_epochs, *extra):
    # Module fixtures run before conftest's per-test thread setting; a different thread count
    # changes float summation order, and the resume tests compare runs bit for bit.
    torch.set_num_threads(1)
    return main(fit_args(market, run_dir, max_epochs, [*QUIET, *extra]))


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    return write_tiny_market(tmp_path_factory.mktemp("market"))


@pytest.fixture(scope="module")
def eight_epochs(market, tmp_path_factory):
    """An uninterrupted deterministic fit of 8 epochs with the default training: section."""
    run_dir = tmp_path_factory.mktemp("eight_epochs")
    fit(market, run_dir, 8)
    return run_dir / "checkpoints"


def test_eight_epochs_leave_the_five_newest_epoch_files_and_the_best(eight_epochs):
    assert names(eight_epochs) == ["best_model.pth"] + [f"epoch_{n}.pth" for n in range(3, 8)]

    history = load(eight_epochs / "epoch_7.pth")["val_history"]
    accuracies = history["accuracy"]
    best_epoch = max(range(8), key=lambda epoch: (accuracies[epoch], -epoch))
    best = load(eight_epochs / "best_model.pth")
    assert best["epoch"] == best_epoch
    assert best["val_accuracy"] == accuracies[best_epoch] == best["best_val_acc"]
    assert best["best"] == {"monitor": "val_accuracy", "mode": "max",
                            "score": accuracies[best_epoch], "epoch": best_epoch}
    assert torch.equal(best["model_state_dict"]["head.3.weight"],
                       load(eight_epochs / f"epoch_{best_epoch}.pth")["model_state_dict"]
                       ["head.3.weight"])


@pytest.mark.parametrize("epoch", range(3, 8))
def test_epoch_file_keys_types_and_values(eight_epochs, epoch):
    checkpoint = load(eight_epochs / f"epoch_{epoch}.pth")

    assert checkpoint["epoch"] == epoch and isinstance(checkpoint["epoch"], int)
    assert checkpoint["global_step"] == 18 * (epoch + 1)
    for key in ("state_dict", "loops", "optimizer_states", "lr_schedulers", "callbacks",
                "hyper_parameters"):
        assert key in checkpoint, key
    for key in USER_FLOAT_KEYS:
        assert type(checkpoint[key]) is float and math.isfinite(checkpoint[key]), key
    assert 0.0 < checkpoint["val_accuracy"] < 1.0 and 1.0 < checkpoint["val_loss"] < 2.0
    assert 0.0 < checkpoint["gate_mean"] < 1.0 and 0.0 < checkpoint["gate_std"] < 0.5

    train, val = checkpoint["train_history"], checkpoint["val_history"]
    assert set(train) == TRAIN_HISTORY_KEYS and set(val) == VAL_HISTORY_KEYS
    assert train["epoch"] == val["epoch"] == list(range(epoch + 1))
    assert all(len(values) == epoch + 1 for values in (*train.values(), *val.values()))
    assert all(type(value) is float for value in train["loss"] + val["RankIC"])
    assert train["loss"][-1] == checkpoint["train_loss"]
    assert val["accuracy"][-1] == checkpoint["val_accuracy"]
    assert val["IC"][-1] == checkpoint["val_IC"] and val["RankIC"][-1] == checkpoint["val_RankIC"]
    assert checkpoint["best_val_acc"] == max(val["accuracy"])
    # Cosine from 5e-4 over 8 epochs: the first epoch trains at the base rate, then it falls.
    assert train["lr"][0] == pytest.approx(5e-4)
    assert all(earlier > later for earlier, later in zip(train["lr"], train["lr"][1:]))

    assert set(checkpoint["optimizer_state_dict"]) == {"state", "param_groups"}
    assert checkpoint["scheduler_state_dict"]["last_epoch"] == epoch + 1
    model = GatedGraphNet(12, 3, [5, 10], 5, 16, "gru", 2, 1, True, 0.5, 0.1)
    model.load_state_dict(checkpoint["model_state_dict"])  # the bare model, no Lightning


def test_aliased_keys_cost_no_extra_bytes(eight_epochs):
    checkpoint = load(eight_epochs / "epoch_7.pth")
    weights = checkpoint["model_state_dict"]
    weight_bytes = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())

    def saved_size(obj) -> int:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.tell()

    aliases = ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict",
               "train_history", "val_history")
    without = {key: value for key, value in checkpoint.items() if key not in aliases}
    copied = {**checkpoint, "model_state_dict": {name: tensor.clone()
                                                 for name, tensor in weights.items()}}
    # torch.load keeps the sharing, so re-saving measures what the aliases cost in the file:
    # a name and a record per tensor, no tensor bytes; a real copy costs the weights again.
    assert saved_size(checkpoint) - saved_size(without) < 256 * len(weights)
    assert saved_size(copied) - saved_size(checkpoint) > weight_bytes


def test_resume_from_the_third_epoch_file_equals_the_uninterrupted_run(eight_epochs, market,
                                                                       tmp_path):
    resumed_from = eight_epochs / "epoch_5.pth"  # the third of the five kept
    fit(market, tmp_path, 8, f"--ckpt_path={resumed_from}")

    folder = tmp_path / "checkpoints"
    assert names(folder) == ["best_model.pth", "epoch_6.pth", "epoch_7.pth"]
    expected, resumed = load(eight_epochs / "epoch_7.pth"), load(folder / "epoch_7.pth")
    for name, tensor in expected["model_state_dict"].items():
        assert torch.equal(tensor, resumed["model_state_dict"][name]), name
    expected_state = expected["optimizer_state_dict"]["state"]
    for index, state in resumed["optimizer_state_dict"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], expected_state[index]["exp_avg_sq"])
    assert resumed["optimizer_state_dict"]["param_groups"] == \
        expected["optimizer_state_dict"]["param_groups"]
    assert resumed["scheduler_state_dict"] == expected["scheduler_state_dict"]
    assert resumed["train_history"] == expected["train_history"]
    assert resumed["val_history"] == expected["val_history"]
    assert resumed["global_step"] == expected["global_step"] == 144
    assert resumed["best_val_acc"] == expected["best_val_acc"]
    assert load(resumed_from)["epoch"] + 1 == 6 == resumed["train_history"]["epoch"][6]


def test_plateau_scheduler_resumes_with_the_step_lightning_takes_after_the_hook(market,
                                                                               tmp_path):
    plateau = ["--model.scheduler=plateau", "--model.scheduler_step_size=0",
               "--training.keep_last=8"]
    fit(market, tmp_path / "whole", 4, *plateau)
    fit(market, tmp_path / "resumed", 4, *plateau,
        f"--ckpt_path={tmp_path / 'whole' / 'checkpoints' / 'epoch_1.pth'}")

    expected = load(tmp_path / "whole" / "checkpoints" / "epoch_3.pth")
    resumed = load(tmp_path / "resumed" / "checkpoints" / "epoch_3.pth")
    assert resumed["scheduler_state_dict"] == expected["scheduler_state_dict"]
    assert expected["scheduler_state_dict"]["last_epoch"] == 3
    assert resumed["train_history"]["lr"] == expected["train_history"]["lr"]


def test_resume_in_the_same_folder_replaces_best_only_with_a_better_model(eight_epochs, market,
                                                                          tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(eight_epochs, folder)
    best_before = (folder / "best_model.pth").stat()
    best_epoch = load(folder / "best_model.pth")["epoch"]
    assert best_epoch > 5  # newer than the file resumed from, and not beaten again

    fit(market, tmp_path, 8, f"--ckpt_path={folder / 'epoch_5.pth'}")

    best_after = (folder / "best_model.pth").stat()
    assert (best_after.st_ino, best_after.st_mtime_ns) == (best_before.st_ino,
                                                           best_before.st_mtime_ns)
    assert names(folder) == ["best_model.pth"] + [f"epoch_{n}.pth" for n in range(3, 8)]
    assert load(folder / "epoch_7.pth")["callbacks"]["CheckpointManager"]["best_epoch"] == \
        best_epoch


def test_resume_into_a_folder_with_another_runs_files_leaves_them_untouched(market, tmp_path,
                                                                            eight_epochs):
    fit(market, tmp_path / "short", 2)
    folder = tmp_path / "shared" / "checkpoints"
    folder.mkdir(parents=True)
    for source, name in (("epoch_3.pth", "epoch_0.pth"), ("epoch_4.pth", "epoch_1.pth"),
                         ("best_model.pth", "backup_best.pth")):
        shutil.copy2(eight_epochs / source, folder / name)
    (folder / "notes.txt").write_text("another run")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    fit(market, tmp_path / "shared", 5, "--training.keep_last=2",
        f"--ckpt_path={tmp_path / 'short' / 'checkpoints' / 'epoch_1.pth'}")

    assert {name: (folder / name).read_bytes() for name in before} == before
    assert names(folder) == sorted([*before, "best_model.pth", "epoch_3.pth", "epoch_4.pth"])
    assert load(folder / "epoch_4.pth")["run_id"] == \
        load(tmp_path / "short" / "checkpoints" / "epoch_1.pth")["run_id"]


def test_a_run_that_would_overwrite_another_runs_files_stops_before_training(market, tmp_path,
                                                                             eight_epochs):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy2(eight_epochs / "best_model.pth", folder / "best_model.pth")
    shutil.copy2(eight_epochs / "epoch_3.pth", folder / "epoch_1.pth")
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    with pytest.raises(ForeignCheckpointError, match=r"best_model\.pth, epoch_1\.pth"):
        fit(market, tmp_path, 3)

    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before


def test_changed_model_shape_fails_fast_naming_the_parameters(eight_epochs, market, tmp_path):
    with pytest.raises(ValueError) as raised:
        fit(market, tmp_path, 8, "--model.hidden_size=8",
            f"--ckpt_path={eight_epochs / 'epoch_5.pth'}")
    message = str(raised.value)
    assert "model.gate.0.weight is (16, 32) in the checkpoint, (8, 16) now" in message
    assert "and 17 more" in message  # 29 parameters differ; the first 12 are named
    assert "model.hidden_size: 16 in the checkpoint, 8 now" in message
    assert not (tmp_path / "checkpoints").exists()


def test_other_setting_differences_come_in_one_warning(eight_epochs, market, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # max_epochs 6: the resumed run has nothing left to train, only the check runs.
        fit(market, tmp_path, 6, "--model.dropout=0.2", "--data.batch_size=4",
            f"--ckpt_path={eight_epochs / 'epoch_5.pth'}")
    about_settings = [str(warning.message) for warning in caught
                      if "differ from the checkpoint" in str(warning.message)]
    assert len(about_settings) == 1
    assert "model.dropout: 0.1 in the checkpoint, 0.2 now" in about_settings[0]
    assert "data.batch_size: 8 in the checkpoint, 4 now" in about_settings[0]


def test_ckpt_path_last_and_best_resolve_to_files_of_save_dir(eight_epochs, market, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(eight_epochs, folder)
    cli = fit(market, tmp_path, 9, "--ckpt_path=last")
    assert cli.trainer.ckpt_path == str(folder / "epoch_7.pth")
    assert load(folder / "epoch_8.pth")["train_history"]["epoch"] == list(range(9))

    cli = main(["test", *fit_args(market, tmp_path, 9, [*QUIET, "--ckpt_path=best"])[1:]])
    assert cli.trainer.ckpt_path == str(folder / "best_model.pth")


def test_history_bound_keeps_the_file_size_flat_across_epochs_and_resumes(market, tmp_path):
    bounded = ["--training.history_max_epochs=2", "--training.keep_last=2"]
    fit(market, tmp_path, 5, *bounded)
    folder = tmp_path / "checkpoints"
    sizes = {n: (folder / f"epoch_{n}.pth").stat().st_size for n in (3, 4)}
    fit(market, tmp_path, 7, *bounded, "--ckpt_path=last")
    sizes.update({n: (folder / f"epoch_{n}.pth").stat().st_size for n in (5, 6)})

    checkpoint = load(folder / "epoch_6.pth")
    assert checkpoint["train_history"]["epoch"] == checkpoint["val_history"]["epoch"] == [5, 6]
    assert all(len(values) == 2 for values in checkpoint["train_history"].values())
    # Zip records are 64-byte aligned; after the resume the protected file adds one name.
    assert max(sizes.values()) - min(sizes.values()) <= 128, sizes
    assert names(folder) == ["best_model.pth", "epoch_4.pth", "epoch_5.pth", "epoch_6.pth"]


def test_save_best_only_false_rewrites_best_every_epoch(market, tmp_path):
    fit(market, tmp_path, 3, "--training.save_best_only=false",
        "--training.save_every_epoch=false")
    folder = tmp_path / "checkpoints"
    assert names(folder) == ["best_model.pth"]
    assert load(folder / "best_model.pth")["epoch"] == 2


def test_the_users_snippets_work_as_written(eight_epochs, tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. Resume by hand: model, optimizer, scheduler, histories, then the next epoch.
    checkpoint = torch.load(eight_epochs / "epoch_5.pth", weights_only=True)
    model = GatedGraphNet(12, 3, [5, 10], 5, 16, "gru", 2, 1, True, 0.5, 0.1)
    model.load_state_dict(checkpoint["model_state_dict"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8, eta_min=1e-6)
    if checkpoint["scheduler_state_dict"] is not None:
        scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
    train_history = checkpoint["train_history"]
    val_history = checkpoint["val_history"]
    start_epoch = checkpoint["epoch"] + 1

    later = load(eight_epochs / "epoch_7.pth")["train_history"]
    assert start_epoch == 6 and len(train_history["loss"]) == len(val_history["loss"]) == 6
    assert optimizer.param_groups[0]["lr"] == pytest.approx(later["lr"][start_epoch])

    # 2. Check progress.
    print(f"Epoch: {checkpoint['epoch']}")
    print(f"Train Loss: {checkpoint['train_loss']:.4f}")
    print(f"Train Acc: {checkpoint['train_accuracy'] * 100:.2f}%")
    print(f"Val Loss: {checkpoint['val_loss']:.4f}")
    print(f"Val Acc: {checkpoint['val_accuracy'] * 100:.2f}%")
    print(f"Best Val Acc: {checkpoint['best_val_acc'] * 100:.2f}%")
    printed = capsys.readouterr().out
    assert "Epoch: 5" in printed
    assert f"Val Acc: {checkpoint['val_accuracy'] * 100:.2f}%" in printed

    # 3. Analyse the history.
    plt.figure()
    plt.plot(train_history["loss"], label="Train Loss")
    plt.plot(val_history["loss"], label="Val Loss")
    plt.legend()
    plt.savefig(tmp_path / "history.png")
    lines = plt.gca().get_lines()
    plt.close()
    assert list(lines[1].get_ydata()) == val_history["loss"]
    assert (tmp_path / "history.png").stat().st_size > 1000

