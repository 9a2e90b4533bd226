"""Training health with the real checkpoint manager: NaN, rollback and error files on disk."""

import pytest
import torch
from health_helpers import (
    InjectNaNInput,
    WeightProbe,
    alert_counts,
    build,
    health,
    make_trainer,
    messages,
    same_state,
)
from test_health_oom import _fail_when, _stage_filter, cuda_oom, mps_oom

from callbacks.checkpoint import CheckpointManager
from callbacks.nan_guard import NAN_WARNING
from callbacks.training_config import TrainingConfig


def _manager(tmp_path) -> CheckpointManager:
    return CheckpointManager(TrainingConfig(save_dir=str(tmp_path / "checkpoints")))


def _trainer(tmp_path, callbacks, max_epochs: int = 2):
    return make_trainer(tmp_path, [*callbacks, _manager(tmp_path)], max_epochs=max_epochs,
                        enable_checkpointing=True)


def test_nan_checkpoint_holds_the_last_finite_weights_and_the_warning(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    inject = InjectNaNInput([(1, 2)])
    probe = WeightProbe([(1, 2)])
    trainer = _trainer(tmp_path, [inject, probe, *health()])
    trainer.fit(module, datamodule)

    path = tmp_path / "checkpoints" / "epoch_1_nan.pth"
    saved = torch.load(path, weights_only=True)
    assert same_state(saved["model_state_dict"], probe.before[(1, 2)])
    info = saved["nan_info"]
    assert info["warning"] == NAN_WARNING and info["batch_idx"] == 2 and info["epoch"] == 1
    day, node, _ = inject.hits[0]
    assert info["non_finite_inputs"] == [
        f"{datamodule.dates[day].strftime('%Y-%m-%d')}, {datamodule.nodes[node]}, log_return"]
    assert f"Saved {path}." in messages(trainer, "nan_inf")[0]


def test_rollback_restores_the_managers_newest_epoch_file(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    probe = WeightProbe([(1, 3)])
    trainer = _trainer(tmp_path, [InjectNaNInput([(1, 3)]), probe,
                                  *health(nan_policy="rollback")])
    trainer.fit(module, datamodule)

    newest = torch.load(tmp_path / "checkpoints" / "epoch_0.pth", weights_only=True)
    assert same_state(probe.after[(1, 3)], newest["model_state_dict"])
    assert probe.lr_after[(1, 3)] == pytest.approx(probe.lr_before[(1, 3)] / 2, rel=1e-12)
    assert "epoch_0.pth (model and optimizer state)" in messages(trainer, "nan_inf")[0]


@pytest.mark.parametrize("stage, make_error, name", [
    ("train", cuda_oom, "epoch_0_error.pth"),
    ("val", mps_oom, "epoch_0_val_error.pth"),
])
def test_out_of_memory_stop_leaves_the_managers_error_file(tiny_market, tmp_path, stage,
                                                           make_error, name):
    datamodule, module = build(tiny_market)
    _fail_when(module, _stage_filter(module, stage), make_error)
    trainer = _trainer(tmp_path, health())
    with pytest.raises(type(make_error())):
        trainer.fit(module, datamodule)

    saved = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
    assert saved["error_info"]["type"] == type(make_error()).__qualname__
    assert "out of memory" in saved["error_info"]["message"]
    assert alert_counts(trainer) == {"out_of_memory": 1}


def test_out_of_memory_split_writes_the_error_file_and_goes_on(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    _fail_when(module, lambda graph: module.trainer.training and graph.num_days > 4, cuda_oom)
    trainer = _trainer(tmp_path, health(oom_policy="split"), max_epochs=1)
    trainer.fit(module, datamodule)

    folder = tmp_path / "checkpoints"
    saved = torch.load(folder / "epoch_0_error.pth", weights_only=True)
    assert saved["error_info"]["type"] == "OutOfMemoryError"
    assert (folder / "epoch_0.pth").is_file() and not (folder / "epoch_0_val_error.pth").exists()
    assert alert_counts(trainer) == {"out_of_memory": 1}
