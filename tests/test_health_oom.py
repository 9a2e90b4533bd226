"""Out of memory: recognised on CUDA and MPS, released, reported; ``split`` keeps the gradient."""

import pytest
import torch
from health_helpers import (
    FakeManager,
    WeightProbe,
    alert_counts,
    build,
    health,
    make_trainer,
    messages,
)

from callbacks import oom
from callbacks.oom import OOM_ADVICE
from lit_models.batch_splitting import (
    BatchSplitter,
    count_labelled,
    halve_batch,
    is_out_of_memory,
)
from lit_models.batching import to_graph_batch


def cuda_oom() -> BaseException:
    return torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        "23.65 GiB of which 1.05 GiB is free.")


def mps_oom() -> BaseException:
    return RuntimeError(
        "MPS backend out of memory (MPS allocated: 17.80 GB, other allocations: 1.20 GB, max "
        "allowed: 18.13 GB). Tried to allocate 512.00 MB on private pool.")


ERRORS = {"cuda": cuda_oom, "mps": mps_oom}


def test_out_of_memory_errors_of_both_devices_are_recognised():
    assert is_out_of_memory(cuda_oom()) and is_out_of_memory(mps_oom())
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("MPS backend out of memory"))


def _fail_when(module, should_fail, make_error):
    """Make ``module._forward_loss`` raise ``make_error()`` whenever ``should_fail(graph)``."""
    forward_loss = module._forward_loss
    calls = []

    def failing(graph):
        calls.append(graph.num_days)
        if should_fail(graph):
            raise make_error()
        return forward_loss(graph)

    module._forward_loss = failing
    return calls


def _training_batch(datamodule):
    return next(iter(datamodule.train_dataloader()))


# -- splitting, without a Trainer --------------------------------------------------------


def test_halving_splits_days_or_pooled_rows_and_refuses_single_days(tiny_market):
    datamodule, _ = build(tiny_market)
    batch = _training_batch(datamodule)
    first, second = halve_batch(batch)
    assert [len(first), len(second)] == [4, 4] and first + second == batch
    assert count_labelled(first) + count_labelled(second) == count_labelled(batch)
    assert halve_batch(batch[:1]) is None and halve_batch(batch[0]) is None

    pooled = {"x": torch.zeros(5, 3, 2), "label": torch.arange(5), "day": torch.arange(5)}
    top, bottom = halve_batch(pooled)
    assert top["label"].tolist() == [0, 1] and bottom["label"].tolist() == [2, 3, 4]


@pytest.mark.parametrize("device", sorted(ERRORS))
def test_split_step_gives_the_gradient_of_the_whole_batch(tiny_market, device):
    datamodule, module = build(tiny_market, dropout=0.0)
    module.train()
    batch = _training_batch(datamodule)

    module.zero_grad()
    _, whole_loss, whole_labelled = module._forward_loss(to_graph_batch(batch))
    whole_loss.backward()
    expected = {name: p.grad.clone() for name, p in module.named_parameters()
                if p.grad is not None}

    events = []
    calls = _fail_when(module, lambda graph: graph.num_days > 2, ERRORS[device])
    module._record = lambda *args: None  # metrics need a Trainer; not under test here
    splitter = BatchSplitter(3, lambda error, stage, halvings, gave_up: events.append(
        (type(error).__name__, stage, halvings, gave_up)))
    module.zero_grad()
    result = splitter.training_step(module, batch)
    result["loss"].backward()

    assert calls == [8, 4, 2, 2, 4, 2, 2]
    assert [event[2:] for event in events] == [(1, False), (2, False), (2, False)]
    assert {event[1] for event in events} == {"train"}
    assert result["num_labelled"] == whole_labelled
    assert float(result["loss"]) == pytest.approx(float(whole_loss), abs=1e-6)
    got = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for name, gradient in expected.items():
        assert torch.allclose(got[name], gradient, rtol=0, atol=1e-6), name

    # The next batch starts in quarters at once: no second out-of-memory error.
    calls.clear()
    splitter.training_step(module, batch)
    assert calls == [2, 2, 2, 2] and len(events) == 3


def test_split_gives_up_after_three_halvings(tiny_market):
    datamodule, module = build(tiny_market, dropout=0.0)
    events = []
    calls = _fail_when(module, lambda graph: True, mps_oom)
    splitter = BatchSplitter(3, lambda error, stage, halvings, gave_up: events.append(
        (halvings, gave_up)))
    with pytest.raises(RuntimeError, match="MPS backend out of memory"):
        splitter.training_step(module, _training_batch(datamodule))
    assert calls == [8, 4, 2, 1]
    assert events == [(1, False), (2, False), (3, False), (4, True)]


def test_split_passes_other_errors_through(tiny_market):
    datamodule, module = build(tiny_market)
    _fail_when(module, lambda graph: True, lambda: RuntimeError("shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes"):
        BatchSplitter(3, None).training_step(module, _training_batch(datamodule))


# -- in a fit ----------------------------------------------------------------------------


def _stage_filter(module, stage: str):
    def should_fail(graph) -> bool:
        trainer = module.trainer
        if trainer.sanity_checking or trainer.global_step < 2:
            return False
        return trainer.validating if stage == "val" else trainer.training
    return should_fail


@pytest.mark.parametrize("device", sorted(ERRORS))
@pytest.mark.parametrize("stage", ["train", "val"])
def test_stop_policy_releases_reports_and_stops(tiny_market, tmp_path, monkeypatch, device,
                                                stage):
    released = []
    monkeypatch.setattr(oom, "release_memory",
                        lambda error, device=None: released.append(type(error)))
    datamodule, module = build(tiny_market)
    _fail_when(module, _stage_filter(module, stage), ERRORS[device])
    trainer = make_trainer(tmp_path, [*health()])

    with pytest.raises(type(ERRORS[device]())):
        trainer.fit(module, datamodule)

    assert released == [type(ERRORS[device]())]
    assert alert_counts(trainer) == {"out_of_memory": 1}
    [message] = messages(trainer, "out_of_memory")
    where = "validation" if stage == "val" else "training"
    assert message.startswith(f"⚠ Warning: Out of memory in {where} (epoch 0,")
    assert "Training stops (oom_policy=stop)." in message and OOM_ADVICE in message
    for advice in ("batch_size 4-8", "num_center_nodes 6-8", "accumulate_grad_batches",
                   "accelerator=cpu"):
        assert advice in message


def test_split_policy_trains_as_if_memory_had_sufficed(tiny_market, tmp_path, device="mps"):
    # Adam turns tiny rounding differences of near-zero gradients into visible weight changes
    # of the order of one step; a small learning rate keeps that far below the tolerance.
    datamodule, module = build(tiny_market, dropout=0.0, learning_rate=5e-5)
    reference = make_trainer(tmp_path / "reference", [], max_epochs=1)
    reference.fit(module, datamodule)
    expected = {k: v.clone() for k, v in module.model.state_dict().items()}
    expected_loss = float(reference.callback_metrics["train_loss"])
    expected_accuracy = float(reference.callback_metrics["val_accuracy"])

    datamodule, module = build(tiny_market, dropout=0.0, learning_rate=5e-5)
    calls = _fail_when(module, lambda graph: graph.num_days > 4, ERRORS[device])
    manager = FakeManager(tmp_path / "checkpoints")
    probe = WeightProbe()
    trainer = make_trainer(tmp_path / "split", [probe, manager, *health(oom_policy="split")],
                           max_epochs=1)
    trainer.fit(module, datamodule)

    # One error in the sanity check's validation, one in the first training batch; every
    # later batch starts in halves.
    assert probe.batches == 18 and sum(1 for days in calls if days > 4) == 2
    # Halves of 4 days: 18 training batches, 2 sanity-check batches, validation's (8, 8, 8, 5).
    assert calls.count(4) == 2 * 18 + 2 * 2 + 2 * 3
    name = type(ERRORS[device]()).__name__
    assert manager.error_calls == [(0, "val", name), (0, "train", name)]
    assert alert_counts(trainer) == {"out_of_memory": 2}
    assert "Retrying the batch in halves (halving 1 of 3" in messages(trainer, "out_of_memory")[0]
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(expected_loss,
                                                                          abs=1e-5)
    assert float(trainer.callback_metrics["val_accuracy"]) == pytest.approx(expected_accuracy)
    for name, value in module.model.state_dict().items():
        assert torch.allclose(value, expected[name], rtol=0, atol=1e-5), name
    assert module.batch_splitter is None  # switched off when fit ends


def test_split_policy_gives_up_and_stops(tiny_market, tmp_path):
    datamodule, module = build(tiny_market)
    _fail_when(module, lambda graph: module.trainer.training, cuda_oom)
    probe = WeightProbe([(0, 0)])
    trainer = make_trainer(tmp_path, [probe, *health(oom_policy="split")], max_epochs=1)
    with pytest.raises(torch.OutOfMemoryError):
        trainer.fit(module, datamodule)
    shown = messages(trainer, "out_of_memory")
    assert len(shown) == 4  # halvings 1-3, then the give-up; on_exception adds no duplicate
    assert "Cannot split the batch further (3 halvings): training stops." in shown[-1]
    assert probe.batches == 0
