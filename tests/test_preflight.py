"""The preflight checklist: each check on real and broken inputs, ``ckpt.py doctor``, and the
callback that stops fit on a ✘."""

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fit_args, write_tiny_market

import ckpt
from callbacks import preflight
from callbacks.fit_report import collect_alerts
from callbacks.preflight import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Preflight,
    PreflightError,
    check_day_sizes,
    check_disk,
    check_isolated_nodes,
    check_learning_rate,
    check_masked_bars,
    check_write,
    estimate_batch_memory,
)
from datamodules.market_datamodule import MarketDataModule

ITEMS = ("disk space", "write probe", "device memory", "batch memory", "learning rate",
         "masked bars", "day sizes", "graph edges", "dry run")


def doctor_args(market, run_dir, *extra) -> list:
    """``ckpt.py doctor`` arguments for the conftest's fast run (its ``fit`` dropped)."""
    return ["doctor", *fit_args(market, run_dir)[1:], *extra]


def items_of(out: str) -> dict:
    """Checklist item name -> (symbol, detail) from the printed checklist."""
    found = {}
    for line in out.splitlines():
        for name in ITEMS:
            if line.startswith("  ") and line[4:].startswith(name):
                found[name] = (line[2], line[4 + len(name):].strip())
    return found


def prepared_market(folder: Path, **kwargs) -> MarketDataModule:
    datamodule = MarketDataModule(path=str(folder), window_sizes=[5, 10], **kwargs)
    datamodule.setup("fit")
    return datamodule


# -- single checks ------------------------------------------------------------------------------

@pytest.mark.parametrize("learning_rate, status", [
    (5e-5, OK), (1e-6, OK), (1e-2, OK), (0.5, WARN), (1e-8, WARN), (0.0, FAIL),
    (-1e-3, FAIL), (math.nan, FAIL), (None, WARN)])
def test_learning_rate_range(learning_rate, status):
    assert check_learning_rate(learning_rate)[0] == status


def test_write_probe_passes_and_leaves_nothing(tmp_path):
    (tmp_path / "checkpoints").mkdir()

    assert check_write(tmp_path / "checkpoints") == (OK, f"{tmp_path / 'checkpoints'} is writable")
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_write_probe_of_a_missing_folder_creates_nothing(tmp_path):
    status, detail = check_write(tmp_path / "new" / "checkpoints")

    assert status == OK and "can be created and written" in detail
    assert list(tmp_path.iterdir()) == []


def test_write_probe_fails_where_a_folder_cannot_be(tmp_path):
    (tmp_path / "a_file").write_text("x")

    status, detail = check_write(tmp_path / "a_file" / "checkpoints")

    assert status == FAIL and "cannot write" in detail


def test_disk_estimate_scales_with_parameters_and_files(tmp_path, monkeypatch):
    model = torch.nn.Linear(1000, 1000)  # 1001000 float32 parameters, 4004000 bytes
    per_file = 4_004_000 * 3 + preflight.CHECKPOINT_OVERHEAD_BYTES
    needed = per_file * (5 + 1 + preflight.ERROR_SLOTS + 1) * preflight.DISK_MARGIN

    monkeypatch.setattr(preflight, "free_disk_bytes", lambda folder: int(needed) + 1)
    assert check_disk(tmp_path, model, 5, 10.0)[0] == OK
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda folder: int(needed) - 1)
    status, detail = check_disk(tmp_path, model, 5, 10.0)
    assert status == FAIL and "10 files" in detail


def test_disk_falls_back_to_min_free_gb_without_an_estimate(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda folder: 9 * preflight.GIGABYTE)

    assert check_disk(tmp_path, torch.nn.Identity(), 5, 10.0)[0] == WARN
    assert check_disk(tmp_path, torch.nn.Identity(), 5, 8.0)[0] == OK


def test_data_checks_on_a_clean_market(tiny_market):
    datamodule = prepared_market(tiny_market)

    assert check_masked_bars(datamodule) == (
        OK, "0.0% of 2628 bars masked (missing, or a move beyond data.max_abs_return)")
    assert check_day_sizes(datamodule)[0] == OK
    status, detail = check_isolated_nodes(datamodule)
    assert status == OK and detail.startswith("1 of 12 nodes have no edges")


def test_data_checks_flag_holes_small_days_and_a_missing_graph(tmp_path):
    folder = write_tiny_market(tmp_path / "holey")
    close = pd.read_csv(folder / "close.csv", index_col="date")
    holes = np.random.default_rng(1).random(close.shape) < 0.6
    close = close.mask(holes)
    close.to_csv(folder / "close.csv")
    (folder / "sectors.csv").unlink()

    datamodule = prepared_market(folder)

    masked_status, masked_detail = check_masked_bars(datamodule)
    assert masked_status == WARN and float(masked_detail.split("%")[0]) > 50
    assert check_day_sizes(datamodule)[0] in (WARN, FAIL)
    status, detail = check_isolated_nodes(datamodule)
    assert status == WARN and detail.startswith("12 of 12 nodes have no edges")
    assert check_isolated_nodes(prepared_market(folder, graph="none"))[0] == OK


def test_batch_memory_grows_with_batch_size_and_centers(tiny_market):
    from lit_models.lit_gated_gnn import GatedGNNModule

    small = prepared_market(tiny_market, batch_size=2, num_center_nodes=2)
    large = prepared_market(tiny_market, batch_size=8, num_center_nodes=8)
    model = GatedGNNModule(num_nodes=12, num_features=3, window_sizes=[5, 10], hidden_size=16,
                           num_heads=2)

    small_estimate = estimate_batch_memory(model, small)
    large_estimate = estimate_batch_memory(model, large)

    assert small_estimate["per_day"] == large_estimate["per_day"] > 0
    assert large_estimate["train_batch"] > 4 * small_estimate["train_batch"]
    assert large_estimate["train_nodes"] == 12  # the whole universe at most


# -- doctor -------------------------------------------------------------------------------------

def test_doctor_prints_every_item_and_passes(tiny_market, tmp_path, capsys):
    status = ckpt.main(doctor_args(tiny_market, tmp_path))
    out = capsys.readouterr().out

    items = items_of(out)
    assert status == 0
    assert set(items) == set(ITEMS)
    assert all(symbol == "✔" for name, (symbol, _) in items.items() if name != "dry run")
    assert items["dry run"][0] == "–"
    assert items["device memory"][1] == "CPU: n/a"
    assert items["learning rate"][1].startswith("0.0005 within")
    seconds = float(out.split("Preflight checklist (")[1].split(" s)")[0])
    assert seconds < 5.0


def test_doctor_strict_fails_on_a_warning(tiny_market, tmp_path, capsys):
    lenient = ckpt.main(doctor_args(tiny_market, tmp_path, "--model.learning_rate=0.5"))
    lenient_out = capsys.readouterr().out
    strict = ckpt.main(doctor_args(tiny_market, tmp_path, "--model.learning_rate=0.5",
                                   "--strict"))
    captured = capsys.readouterr()

    assert lenient == 0 and items_of(lenient_out)["learning rate"][0] == "⚠"
    assert strict == 1 and "--strict" in captured.err
    assert "1 warning(s), 0 failure(s)" in captured.out


def test_doctor_dry_run_runs_one_batch(tiny_market, tmp_path, capsys):
    status = ckpt.main(doctor_args(tiny_market, tmp_path, "--dry-run"))

    symbol, detail = items_of(capsys.readouterr().out)["dry run"]
    assert status == 0 and symbol == "✔"
    assert detail.startswith("8 day(s), ")
    assert math.isfinite(float(detail.split("loss ")[1].split(",")[0]))


def test_dry_run_leaves_weights_gradients_and_random_state_alone(tiny_market, tmp_path):
    cli = ckpt._build_cli(fit_args(tiny_market, tmp_path)[1:])
    weights = {name: value.clone() for name, value in cli.model.state_dict().items()}
    random_state = torch.get_rng_state()

    status, _ = preflight.check_dry_run(cli.model, cli.datamodule, torch.device("cpu"))

    assert status == OK
    assert torch.equal(torch.get_rng_state(), random_state)
    assert all(torch.equal(value, weights[name])
               for name, value in cli.model.state_dict().items())
    assert all(parameter.grad is None for parameter in cli.model.parameters())


# -- the callback in fit ------------------------------------------------------------------------

def test_preflight_in_fit_runs_the_dry_run_and_lets_fit_go(tiny_market, tmp_path, run_fit):
    cli = run_fit(fit_args(tiny_market, tmp_path, max_epochs=1,
                           extra=["--training.preflight_dry_run=true"]))

    check = next(cb for cb in cli.trainer.callbacks if isinstance(cb, Preflight))
    statuses = {item.name: item.status for item in check.checklist.items}
    assert check.checklist.passed(strict=True)
    assert statuses["dry run"] == OK and SKIP not in statuses.values()
    assert cli.trainer.current_epoch == 1


def test_a_failed_check_stops_fit_before_training(tiny_market, tmp_path, run_fit, monkeypatch):
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda folder: 1024)

    with pytest.raises(PreflightError, match="✘ disk space"):
        run_fit(fit_args(tiny_market, tmp_path, max_epochs=1))

    # Nothing trained, and no error checkpoint for a run that never started.
    assert not list((tmp_path / "checkpoints").glob("*.pth"))


def test_preflight_can_be_switched_off(tiny_market, tmp_path, run_fit, monkeypatch):
    monkeypatch.setattr(preflight, "free_disk_bytes", lambda folder: 1024)

    cli = run_fit(fit_args(tiny_market, tmp_path, max_epochs=1,
                           extra=["--training.preflight=false", "--training.report=false"]))

    assert not any(isinstance(cb, Preflight) for cb in cli.trainer.callbacks)


# -- alerts for the after-fit report ------------------------------------------------------------

def test_alert_counts_are_collected_from_metrics_and_callbacks():
    class AlertLog:
        def __init__(self):
            self.counts = {"nan_inf": 2, "large_grad_norm": 1}

    trainer = SimpleNamespace(
        callback_metrics={"alert_low_accuracy": torch.tensor(3.0), "val_loss": torch.tensor(1.0)},
        callbacks=[AlertLog(), SimpleNamespace(alerts=["a", "b"]), object()])

    assert collect_alerts(trainer) == {"alert_low_accuracy": 3, "nan_inf": 2,
                                       "large_grad_norm": 1, "SimpleNamespace": 2}
    assert collect_alerts(SimpleNamespace()) == {}
