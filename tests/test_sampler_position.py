"""The training sampler's position: dealing an epoch out to ranks, saving and resuming inside it,
and an exact resume with loader workers."""

import pytest
import torch
from conftest import fit_args, write_tiny_market
from torch.utils.data import DistributedSampler

from datamodules.samplers import EpochShuffleSampler
from train import main

QUIET = ["--training.report=false", "--training.preflight=false", "--trainer.deterministic=true"]


def indices(sampler) -> list:
    return [index for _, index in sampler]


def test_one_process_yields_the_whole_epoch_order_as_before():
    sampler = EpochShuffleSampler(50, seed=7)
    sampler.set_epoch(3)
    generator = torch.Generator().manual_seed(7 * 100_003 + 3)

    assert indices(sampler) == torch.randperm(50, generator=generator).tolist()
    assert len(sampler) == 50 and all(epoch == 3 for epoch, _ in sampler)


@pytest.mark.parametrize("num_samples", [12, 13])
def test_ranks_take_interleaved_positions_padded_to_equal_shares(num_samples):
    whole = indices(EpochShuffleSampler(num_samples, seed=1))
    padded = whole + whole[: (-num_samples) % 3]
    shares = [indices(EpochShuffleSampler(num_samples, seed=1, num_replicas=3, rank=rank))
              for rank in range(3)]

    assert shares == [padded[rank::3] for rank in range(3)]
    assert {index for share in shares for index in share} == set(range(num_samples))
    assert all(len(EpochShuffleSampler(num_samples, 1, num_replicas=3, rank=rank)) == len(share)
               for rank, share in enumerate(shares))


def test_lightning_leaves_it_unwrapped_under_ddp():
    # Lightning wraps any sampler that is not a DistributedSampler in one that shuffles the
    # positions again, which would make a saved position meaningless.
    assert isinstance(EpochShuffleSampler(10, seed=0), DistributedSampler)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_saved_position_resumes_each_rank_after_its_consumed_batches(ranks):
    batch_size, batches_done = 4, 3
    full = []
    for rank in range(ranks):
        sampler = EpochShuffleSampler(40, seed=5, num_replicas=ranks, rank=rank)
        sampler.set_epoch(2)
        full.append(indices(sampler))
    state = EpochShuffleSampler(40, seed=5, num_replicas=ranks, rank=0)
    state.set_epoch(2)
    saved = state.state_dict(consumed=batches_done * batch_size * ranks)

    for rank in range(ranks):
        resumed = EpochShuffleSampler(40, seed=5, num_replicas=ranks, rank=rank)
        resumed.load_state_dict(saved)
        resumed.set_epoch(2)  # Lightning sets the epoch again at the epoch's start
        assert indices(resumed) == full[rank][batches_done * batch_size:]
        assert indices(resumed) == full[rank]  # one iteration only: the next is whole again


def test_a_position_of_another_epoch_is_not_applied():
    sampler = EpochShuffleSampler(20, seed=5)
    sampler.load_state_dict({"seed": 5, "num_samples": 20, "shuffle": True, "epoch": 1,
                             "consumed": 8})
    sampler.set_epoch(2)
    fresh = EpochShuffleSampler(20, seed=5)
    fresh.set_epoch(2)

    assert indices(sampler) == indices(fresh)


def test_a_position_of_another_order_is_refused_naming_the_differences():
    sampler = EpochShuffleSampler(20, seed=5)
    with pytest.raises(ValueError, match=r"seed 6 in the state, 5 here; num_samples 30"):
        sampler.load_state_dict({"seed": 6, "num_samples": 30, "shuffle": True, "epoch": 0,
                                 "consumed": 4})
    with pytest.raises(ValueError, match=r"consumed must be in \[0, 20\]"):
        sampler.state_dict(consumed=21)


def test_resume_with_loader_workers_reproduces_the_uninterrupted_run(tmp_path):
    # Loader workers fetch indices when Lightning makes the iterator, before it sets the
    # sampler's epoch; without the manager's fresh iterator the resumed epoch would replay
    # epoch 0's order.
    torch.set_num_threads(1)
    market = write_tiny_market(tmp_path / "market")
    workers = [*QUIET, "--data.num_workers=1"]
    main(fit_args(market, tmp_path / "whole", 2, workers))
    resumed_from = tmp_path / "whole" / "checkpoints" / "epoch_0.pth"
    main(fit_args(market, tmp_path / "resumed", 2, [*workers, f"--ckpt_path={resumed_from}"]))

    load = lambda run: torch.load(tmp_path / run / "checkpoints" / "epoch_1.pth",  # noqa: E731
                                  weights_only=True)
    whole, resumed = load("whole"), load("resumed")
    assert resumed["train_history"] == whole["train_history"]
    for name, tensor in whole["model_state_dict"].items():
        assert torch.equal(tensor, resumed["model_state_dict"][name]), name
