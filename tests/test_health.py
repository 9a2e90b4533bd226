"""Training health: each detector fires on an injected fault and stays quiet on a clean run."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import fit_args
from health_helpers import (
    STEPS_PER_EPOCH,
    FakeManager,
    InjectInfGradient,
    InjectNaNInput,
    WeightProbe,
    alert_counts,
    build,
    find,
    health,
    make_trainer,
    messages,
    metrics_csv,
    same_state,
)
from lightning.pytorch.callbacks import Callback

from callbacks.accuracy_monitor import LOW_ACCURACY_WARNING, ValidationAccuracyMonitor
from callbacks.alerts import AlertLog
from callbacks.gate_statistics import GateStatistics
from callbacks.gradient_monitor import LARGE_GRAD_WARNING, GradientNormMonitor, gradient_norm
from callbacks.memory_monitor import GIB, MemoryMonitor, device_total_bytes, used_bytes
from callbacks.nan_guard import NAN_WARNING, NanGuard, non_finite_inputs
from callbacks.oom import OutOfMemoryGuard
from callbacks.progress_monitor import ProgressMonitor

CLEAN = ["--model.learning_rate=0.005", "--data.num_center_nodes=12",
         "--trainer.log_every_n_steps=1"]


def _shown(recwarn, text: str) -> list:
    return [str(w.message) for w in recwarn if str(w.message).startswith(text)]


# -- texts -------------------------------------------------------------------------------


def test_warning_texts_are_the_specs():
    assert NAN_WARNING == "⚠ Warning: NaN/Inf detected in training loss"
    assert LARGE_GRAD_WARNING.format(norm=100.0) == "⚠ Warning: Very large gradient norm: 100.0"
    assert (LOW_ACCURACY_WARNING.format(acc=5.0)
            == "⚠ Warning: Very low validation accuracy: 5.0%")


@pytest.mark.parametrize("make, key, value", [
    (lambda: NanGuard("explode"), "training.nan_policy", "'explode'"),
    (lambda: NanGuard("skip", 0), "training.max_consecutive_nan", "0"),
    (lambda: OutOfMemoryGuard("shrink"), "training.oom_policy", "'shrink'"),
    (lambda: GradientNormMonitor(-1.0), "training.grad_norm_warn", "-1.0"),
    (lambda: MemoryMonitor(1.5), "training.memory_warn_fraction", "1.5"),
    (lambda: ValidationAccuracyMonitor(120.0), "training.min_val_accuracy", "120.0"),
    (lambda: ProgressMonitor(0), "training.patience", "0"),
])
def test_bad_config_values_are_refused_by_name(make, key, value):
    with pytest.raises(ValueError) as error:
        make()
    assert key in str(error.value) and value in str(error.value)


def test_bad_policy_from_the_command_line_names_key_value_and_choices(tiny_market, tmp_path,
                                                                     run_fit):
    with pytest.raises(ValueError) as error:
        run_fit(fit_args(tiny_market, tmp_path, 1, ["--training.nan_policy=explode"]))
    message = str(error.value)
    assert "training.nan_policy" in message and "'explode'" in message
    assert all(choice in message for choice in ("skip", "rollback", "stop"))


# -- a clean run -------------------------------------------------------------------------


def test_clean_three_epoch_run_raises_no_alert(tiny_market, tmp_path, run_fit, recwarn, caplog):
    caplog.set_level(logging.INFO)
    cli = run_fit(fit_args(tiny_market, tmp_path, 3, CLEAN))
    trainer = cli.trainer

    assert alert_counts(trainer) == {}
    assert _shown(recwarn, "⚠") == []
    assert "Training health: no alerts." in caplog.text

    metrics = metrics_csv(trainer)
    grad_norm = metrics["grad_norm"].dropna()
    assert len(grad_norm) == 3 * STEPS_PER_EPOCH == trainer.global_step
    assert ((grad_norm > 0) & (grad_norm < 100)).all()
    peak = metrics["peak_memory_gb"].dropna()
    assert len(peak) == 3 and (peak > 0).all()
    for key in ("train_gate_mean", "train_gate_std", "train_favor_time_ratio",
                "gate_mean", "gate_std", "favor_time_ratio"):
        values = metrics[key].dropna()
        assert len(values) == 3 and values.map(math.isfinite).all(), key
    assert not [column for column in metrics.columns if column.startswith("alert_")]


# -- NaN/Inf -----------------------------------------------------------------------------


def test_nan_input_is_named_skipped_and_checkpointed(tiny_market, tmp_path, recwarn, caplog):
    caplog.set_level(logging.INFO)
    datamodule, module = build(tiny_market)
    inject = InjectNaNInput([(1, 2)])
    probe = WeightProbe([(1, 2), (1, 3)])
    manager = FakeManager(tmp_path / "checkpoints")
    trainer = make_trainer(tmp_path, [inject, probe, manager, GateStatistics(), *health()])
    trainer.fit(module, datamodule)

    assert alert_counts(trainer) == {"nan_inf": 1}
    day, node, _ = inject.hits[0]
    date = datamodule.dates[day].strftime("%Y-%m-%d")
    name = datamodule.nodes[node]
    step = STEPS_PER_EPOCH + 2
    [message] = messages(trainer, "nan_inf")
    assert message.startswith(f"{NAN_WARNING} (epoch 1, step {step}, batch 2; non-finite loss)")
    assert f"({date}, {name}, log_return)" in message
    assert "nan_policy=skip" in message
    assert _shown(recwarn, NAN_WARNING) == [message]

    # Skipped: the bad batch leaves every weight as it was; the next batch trains again.
    assert same_state(probe.before[(1, 2)], probe.after[(1, 2)])
    assert not same_state(probe.before[(1, 3)], probe.after[(1, 3)])
    assert all(value.isfinite().all() for value in module.model.state_dict().values())

    [(epoch, info, weights)] = manager.nan_calls
    assert epoch == 1 and info["batch_idx"] == 2 and info["global_step"] == step
    assert info["non_finite_inputs"] == [f"{date}, {name}, log_return"]
    assert same_state(weights, probe.before[(1, 2)])  # written with the still-finite weights

    assert metrics_csv(trainer)["alert_nan_inf"].dropna().tolist()[-1] == 1.0
    assert f"Training health: 1 alert: nan_inf x1 (first at epoch 1, step {step})" in caplog.text
    assert math.isfinite(float(trainer.callback_metrics["train_gate_mean"]))
    # The dropped step stays out of the epoch mean: train_loss of epoch 1 is a number.
    train_loss = metrics_csv(trainer)["train_loss"].dropna().tolist()
    assert len(train_loss) == 3 and all(map(math.isfinite, train_loss))


def test_inf_gradient_with_finite_loss_is_caught(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    probe = WeightProbe([(0, 4)])
    trainer = make_trainer(tmp_path, [InjectInfGradient([(0, 4)]), probe, *health()],
                           max_epochs=1)
    trainer.fit(module, datamodule)

    [message] = messages(trainer, "nan_inf")
    assert "non-finite gradients" in message and "batch 4" in message
    assert "No non-finite input features in the batch." in message
    assert same_state(probe.before[(0, 4)], probe.after[(0, 4)])
    assert math.isinf(metrics_csv(trainer)["grad_norm"].dropna().iloc[4])


def test_nan_under_gradient_accumulation_skips_the_whole_step(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    inject = InjectNaNInput([(0, 2)])
    probe = WeightProbe([(0, 2), (0, 3)])
    trainer = make_trainer(tmp_path, [inject, probe, *health()], max_epochs=1,
                           accumulate_grad_batches=2)
    trainer.fit(module, datamodule)

    [message] = messages(trainer, "nan_inf")
    assert "(epoch 0, step 1, batches 2-3; non-finite loss)" in message
    day, node, _ = inject.hits[0]
    assert f"({datamodule.dates[day].strftime('%Y-%m-%d')}, {datamodule.nodes[node]}," in message
    assert same_state(probe.before[(0, 2)], probe.after[(0, 3)])


def test_stop_policy_stops_after_the_bad_batch(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    probe = WeightProbe([(0, 2)])
    trainer = make_trainer(tmp_path, [InjectNaNInput([(0, 2)]), probe,
                                      *health(nan_policy="stop")])
    trainer.fit(module, datamodule)

    assert probe.batches == 3 and trainer.should_stop
    assert same_state(probe.before[(0, 2)], probe.after[(0, 2)])
    assert "Training stops after this batch (nan_policy=stop)." in messages(trainer, "nan_inf")[0]


def test_too_many_consecutive_nan_steps_stop_with_a_checklist(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    probe = WeightProbe()
    every_batch = [(0, index) for index in range(STEPS_PER_EPOCH)]
    trainer = make_trainer(tmp_path, [InjectNaNInput(every_batch), probe,
                                      *health(max_consecutive_nan=3)])
    trainer.fit(module, datamodule)

    assert probe.batches == 3 and trainer.should_stop
    assert alert_counts(trainer) == {"nan_inf": 3, "nan_stop": 1}
    [stop] = messages(trainer, "nan_stop")
    assert "3 optimizer steps in a row" in stop
    for hint in ("learning_rate", "gradient_clip_val", "input data", "labels"):
        assert hint in stop


def test_rollback_restores_newest_checkpoint_and_halves_learning_rate(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    probe = WeightProbe([(1, 3)])
    manager = FakeManager(tmp_path / "checkpoints")
    trainer = make_trainer(tmp_path, [InjectNaNInput([(1, 3)]), probe, manager,
                                      *health(nan_policy="rollback")], max_epochs=2)
    trainer.fit(module, datamodule)

    newest = torch.load(manager.epoch_files[0], weights_only=True)
    assert same_state(probe.after[(1, 3)], newest["model_state_dict"])
    assert not same_state(probe.before[(1, 3)], newest["model_state_dict"])
    assert probe.lr_after[(1, 3)] == pytest.approx(probe.lr_before[(1, 3)] / 2, rel=1e-12)
    assert find(trainer, NanGuard).rollbacks == 1
    assert f"Rolled back to {manager.epoch_files[0]}" in messages(trainer, "nan_inf")[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs[0] == pytest.approx(module.hparams.learning_rate / 2)


def test_rollback_without_a_checkpoint_skips_and_halves(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    probe = WeightProbe([(0, 1)])
    trainer = make_trainer(tmp_path, [InjectNaNInput([(0, 1)]), probe,
                                      *health(nan_policy="rollback")], max_epochs=1)
    trainer.fit(module, datamodule)

    assert same_state(probe.before[(0, 1)], probe.after[(0, 1)])
    assert probe.lr_after[(0, 1)] == pytest.approx(probe.lr_before[(0, 1)] / 2, rel=1e-12)
    assert "No epoch checkpoint to roll back to yet" in messages(trainer, "nan_inf")[0]


def test_non_finite_inputs_are_named_by_day_node_and_feature():
    x = torch.zeros(3, 4, 2)
    x[1, 0, 0] = float("nan")
    x[1, 3, 0] = float("inf")  # same node and feature: listed once
    x[2, 2, 1] = -float("inf")
    day = {"x": x, "day": torch.tensor(1), "node_index": torch.tensor([5, 6, 7])}
    found, more = non_finite_inputs([day], dates=["d0", "d1"], nodes=list("abcdefgh"),
                                    features=["log_return", "close_rel"], limit=1)
    assert found == [("d1", "g", "log_return")] and more == 1
    found, more = non_finite_inputs([day])
    assert found == [("1", "6", "0"), ("1", "7", "1")] and more == 0


# -- gradient norm -----------------------------------------------------------------------


def test_gradient_norm_is_the_total_norm_in_float64():
    first = torch.nn.Parameter(torch.zeros(2))
    second = torch.nn.Parameter(torch.zeros(1))
    unused = torch.nn.Parameter(torch.zeros(1))
    first.grad, second.grad = torch.tensor([3e30, 0.0]), torch.tensor([4e30])
    optimizer = torch.optim.SGD([first, second, unused], lr=0.1)
    assert gradient_norm(optimizer) == pytest.approx(5e30)  # float32 squares would overflow
    first.grad = None
    second.grad = None
    assert gradient_norm(optimizer) is None


def test_large_gradient_norm_warns_once_per_epoch_and_counts_every_step(tiny_market, tmp_path,
                                                                        recwarn):
    datamodule, module = build(tiny_market)
    trainer = make_trainer(tmp_path, health(grad_norm_warn=1e-6), max_epochs=2,
                           gradient_clip_val=1e-4)
    trainer.fit(module, datamodule)

    assert alert_counts(trainer) == {"large_grad_norm": 2 * STEPS_PER_EPOCH}
    shown = _shown(recwarn, "⚠ Warning: Very large gradient norm: ")
    assert len(shown) == 2
    assert "(epoch 0, step 0;" in shown[0] and "(epoch 1, step 18;" in shown[1]
    # Logged before clipping: the Trainer clips to 1e-4, the logged norms are far above it.
    logged = metrics_csv(trainer)["grad_norm"].dropna()
    assert len(logged) == 2 * STEPS_PER_EPOCH and (logged > 1e-3).all()
    first = float(logged.iloc[0])
    assert shown[0].startswith(LARGE_GRAD_WARNING.format(norm=first))


# -- validation accuracy -----------------------------------------------------------------


class _CollapseValidationLabels(Callback):
    """Every labelled validation node gets class 0: the majority share becomes 100%."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx,
                                  dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            for day in batch:
                day["label"][day["label"] >= 0] = 0


class _Accuracies(Callback):
    def __init__(self):
        self.values = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.values.append(100.0 * float(trainer.callback_metrics["val_accuracy"]))


def test_default_low_accuracy_threshold_is_half_of_chance():
    assert ValidationAccuracyMonitor().threshold(5) == 10.0
    assert ValidationAccuracyMonitor().threshold(4) == 12.5
    assert ValidationAccuracyMonitor(30.0).threshold(5) == 30.0


def test_low_validation_accuracy_warns_with_the_specs_text(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    accuracies = _Accuracies()
    trainer = make_trainer(tmp_path, [*health(min_val_accuracy=99.0), accuracies],
                           max_epochs=2)
    trainer.fit(module, datamodule)

    shown = messages(trainer, "low_val_accuracy")
    assert len(shown) == 2
    for text, accuracy in zip(shown, accuracies.values, strict=True):
        assert text.startswith(LOW_ACCURACY_WARNING.format(acc=accuracy))
        assert "weight_decay" in text and "label distribution" in text


def test_accuracy_not_beating_the_majority_class_warns_after_the_first_epoch(tiny_market,
                                                                            tmp_path):
    datamodule, module = build(tiny_market)
    trainer = make_trainer(tmp_path, [_CollapseValidationLabels(), *health()])
    trainer.fit(module, datamodule)

    shown = messages(trainer, "val_accuracy_below_majority")
    assert len(shown) == 2  # epochs 1 and 2; the first epoch is a warm-up
    assert "(class 0, 100.0% of the validation labels; epoch 1)" in shown[0]


# -- memory ------------------------------------------------------------------------------


def test_peak_memory_is_logged_and_warned_above_the_fraction(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    trainer = make_trainer(tmp_path, health(memory_warn_fraction=1e-9), max_epochs=2)
    trainer.fit(module, datamodule)

    monitor = find(trainer, MemoryMonitor)
    peak = metrics_csv(trainer)["peak_memory_gb"].dropna()
    assert len(peak) == 2 and (peak > 0.01).all()  # a Python process with torch: > 10 MiB
    assert peak.iloc[-1] == pytest.approx(monitor.peak_bytes / GIB, rel=1e-6)
    shown = messages(trainer, "high_memory")
    assert len(shown) == 2 and "on cpu in epoch 0" in shown[0]


def test_cpu_memory_probes_read_real_numbers():
    used = used_bytes(torch.device("cpu"))
    total = device_total_bytes(torch.device("cpu"))
    assert 10 * 2 ** 20 < used < total


# -- progress ----------------------------------------------------------------------------


def _fake_trainer(alerts: AlertLog):
    return SimpleNamespace(callbacks=[alerts], loggers=[], global_step=0, current_epoch=0,
                           callback_metrics={}, sanity_checking=False)


def test_progress_warns_after_patience_epochs_without_a_new_best():
    alerts = AlertLog()
    trainer = _fake_trainer(alerts)
    monitor = ProgressMonitor(patience=2)
    losses = [1.0, 0.9, 0.95, 0.91, 0.92, 0.93, 0.8]
    accuracies = [0.20, 0.25, 0.30, 0.31, 0.29, 0.30, 0.30]
    for epoch, (loss, accuracy) in enumerate(zip(losses, accuracies, strict=True)):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"train_loss": torch.tensor(loss),
                                    "val_accuracy": torch.tensor(accuracy)}
        monitor.on_validation_end(trainer, None)
        monitor.on_train_epoch_end(trainer, None)

    assert alerts.counts == {"train_loss_stalled": 2, "val_accuracy_stalled": 1}
    stalled = [text for kind, text in alerts.messages if kind == "train_loss_stalled"]
    assert "for 2 epochs (best 0.9000 in epoch 1; now epoch 3)" in stalled[0]
    assert "for 4 epochs (best 0.9000 in epoch 1; now epoch 5)" in stalled[1]
    assert monitor.train_loss.best == pytest.approx(0.8) and monitor.train_loss.stale == 0
    [accuracy] = [text for kind, text in alerts.messages if kind == "val_accuracy_stalled"]
    assert "for 2 epochs (best 31.0% in epoch 3; now epoch 5)" in accuracy


# -- state -------------------------------------------------------------------------------


def test_health_state_survives_a_weights_only_checkpoint(tmp_path):
    alerts, guard, progress = AlertLog(), NanGuard("rollback"), ProgressMonitor(3)
    alerts.counts, alerts.first_seen = {"nan_inf": 2}, {"nan_inf": "epoch 1, step 20"}
    guard.consecutive, guard.total, guard.rollbacks = 2, 5, 1
    progress.train_loss.update(0.7, 4)
    path = tmp_path / "state.pt"
    torch.save({"alerts": alerts.state_dict(), "guard": guard.state_dict(),
                "progress": progress.state_dict()}, path)
    state = torch.load(path, weights_only=True)

    restored_alerts, restored_guard, restored_progress = AlertLog(), NanGuard(), ProgressMonitor()
    restored_alerts.load_state_dict(state["alerts"])
    restored_guard.load_state_dict(state["guard"])
    restored_progress.load_state_dict(state["progress"])
    assert restored_alerts.counts == {"nan_inf": 2}
    assert (restored_guard.consecutive, restored_guard.total, restored_guard.rollbacks) == (2, 5, 1)
    assert restored_progress.train_loss.best == pytest.approx(0.7)
    assert restored_progress.train_loss.best_epoch == 4


def test_alert_summary_lists_every_kind():
    alerts = AlertLog()
    trainer = _fake_trainer(alerts)
    alerts.record(trainer, "nan_inf", "one", warn=False)
    trainer.global_step = 7
    alerts.record(trainer, "nan_inf", "two", warn=False)
    alerts.record(trainer, "high_memory", "three", warn=False)
    assert alerts.summary() == ("Training health: 3 alerts: high_memory x1 (first at epoch 0, "
                                "step 7); nan_inf x2 (first at epoch 0, step 0)")

