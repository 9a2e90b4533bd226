"""The main job end to end: fit, validate, test and predict through train.py."""

import math

import pandas as pd
import pytest
import yaml
from conftest import fit_args, shared_data_or_skip


def _embedded_args(run_dir, cross_sectional: bool, max_epochs=2):
    return fit_args("embedded", run_dir, max_epochs=max_epochs, extra=[
        "--data.start_date=2020-01-01",
        "--data.window_sizes=[20, 40, 80]",
        f"--data.cross_sectional={str(cross_sectional).lower()}",
        "--data.num_center_nodes=6",
        "--data.batch_size=4",
    ])


@pytest.mark.parametrize("cross_sectional", [True, False], ids=["cross_sectional", "pooled"])
def test_two_epoch_fit_on_embedded_data(tmp_path, run_fit, cross_sectional):
    cli = run_fit(_embedded_args(tmp_path, cross_sectional))
    metrics = {key: float(value) for key, value in cli.trainer.callback_metrics.items()}
    assert cli.trainer.current_epoch == 2
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_IC",
                "val_RankIC", "val_ICIR", "val_RankICIR", "gate_mean", "gate_std",
                "favor_time_ratio"):
        assert math.isfinite(metrics[key]), key
    assert 0.0 < metrics["val_accuracy"] < 1.0 and 1.0 < metrics["val_loss"] < 2.5
    assert metrics["val_IC_days"] > 50 and metrics["val_IC_days_skipped"] == 0
    assert 0.0 < metrics["gate_mean"] < 1.0

    logged = pd.read_csv(next((tmp_path / "logs").rglob("metrics.csv")))
    epochs = logged.dropna(subset=["val_RankIC"])
    assert epochs["epoch"].tolist() == [0, 1]


def test_test_and_predict_write_what_they_promise(tmp_path, run_fit):
    args = _embedded_args(tmp_path, True)[1:]
    test = run_fit(["test", *args])
    for key in ("test_loss", "test_accuracy", "test_IC", "test_RankIC", "test_ICIR"):
        assert math.isfinite(float(test.trainer.callback_metrics[key])), key

    output = tmp_path / "predictions.parquet"
    run_fit(["predict", *args, f"--training.predictions_path={output}"])
    table = pd.read_parquet(output)
    assert list(table.columns[:4]) == ["date", "node", "score", "predicted_class"]
    probabilities = [f"prob_{k}" for k in range(5)]
    assert [c for c in table.columns if c.startswith("prob_")] == probabilities
    assert table["node"].nunique() == 20
    assert table.groupby("date").size().eq(20).all()
    assert (table[probabilities].sum(axis=1) - 1).abs().max() < 1e-5
    expected_score = sum(k * table[f"prob_{k}"] for k in range(5))
    assert (expected_score - table["score"]).abs().max() < 1e-5
    assert table["date"].min() >= "2022-01-01"  # the test split of 2020-2022


def test_print_config_lists_every_section(tmp_path, capsys):
    from train import main

    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", "configs/default_config.yaml", "--data.num_center_nodes=6",
              "--print_config"])
    assert stopped.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["num_center_nodes"] == 6
    assert printed["training"]["save_dir"] == "./checkpoints"
    assert printed["model"]["learning_rate"] > 0
    assert printed["trainer"]["gradient_clip_val"] == 1.0


def test_fit_on_sp500_5yr(tmp_path, run_fit):
    data = shared_data_or_skip("sp500_5yr")
    cli = run_fit(fit_args(data, tmp_path, max_epochs=1, extra=[
        "--data.window_sizes=[20, 40, 80]", "--trainer.limit_train_batches=5",
        "--trainer.limit_val_batches=3", "--data.batch_size=4"]))
    assert cli.datamodule.num_nodes == 505 and cli.datamodule.num_features == 6
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["val_RankIC"]))
    assert float(metrics["val_IC_days"]) == 12  # 3 batches of 4 full days
