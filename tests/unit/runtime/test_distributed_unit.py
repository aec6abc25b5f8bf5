"""The distributed helpers in one process, and the sharded form of L_rec that data-parallel training relies on."""

from __future__ import annotations

import pytest
import torch

from pmmrec.errors import PmmrecError
from pmmrec.objectives import log_popularity, next_item_loss
from pmmrec.runtime import distributed


def test_without_torchrun_there_is_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("cpu") == torch.device("cpu")
    assert not distributed.is_initialized()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_varlen(x, grad=True)[0] is x
    assert torch.equal(distributed.all_reduce_sum(x), x)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    with distributed.main_first():
        pass
    distributed.barrier()
    distributed.cleanup()


def test_a_torchrun_world_of_one_is_a_single_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup("cpu") == torch.device("cpu") and not distributed.is_initialized()


@pytest.mark.parametrize(("device", "message"), [
    ("cuda:1", "names one GPU, but torchrun started 2 processes"),
    ("mps", "cannot be shared by torchrun's processes"),
])
def test_a_device_that_processes_cannot_share_is_refused(monkeypatch, device, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(PmmrecError, match=message):
        distributed.setup(device)
    assert not distributed.is_initialized()


def test_torchrun_variables_must_be_numbers(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(PmmrecError, match="WORLD_SIZE='two' is not a number"):
        distributed.setup("cpu")


def test_shard_sizes_are_contiguous_and_balanced():
    assert distributed.shard_sizes(14, 2) == [7, 7]
    assert distributed.shard_sizes(7, 3) == [3, 2, 2]
    assert distributed.shard_sizes(1, 2) == [1, 0]
    assert sum(distributed.shard_sizes(101, 8)) == 101


def test_rank_shares_of_the_gathered_loss_add_up_to_the_whole_batch():
    """What each rank computes (its positions, every rank's slots as candidates, reduction="sum") adds up, over
    the ranks and divided by all positions, to the one-process loss: the same-user and history masks hold after
    the gather. Items repeat across the two halves, so the cross-rank history masking is exercised."""
    gen = torch.Generator().manual_seed(0)
    items = torch.tensor([[0, 0, 3, 1, 2], [0, 4, 5, 6, 1], [2, 3, 3, 7, 8], [0, 0, 0, 5, 9], [1, 9, 8, 2, 4]])
    batch, slots, dim = items.shape[0], items.shape[1], 8
    item_embs = torch.randn(batch, slots, dim, generator=gen)
    user_states = torch.randn(batch, slots - 1, dim, generator=gen)
    log_pop = log_popularity(torch.bincount(items.reshape(-1), minlength=10).double())
    whole = next_item_loss(user_states, item_embs, items, log_pop)
    cand_embs, cand_items = item_embs.reshape(-1, dim), items.reshape(-1)
    total, offset = 0.0, 0
    for part in (slice(0, 3), slice(3, 5)):  # rank 0: users 0-2, rank 1: users 3-4
        n = items[part].numel()
        total = total + next_item_loss(user_states[part], item_embs[part], items[part], log_pop, cand_embs=cand_embs,
                                       cand_items=cand_items, cand_offset=offset, reduction="sum")
        offset += n
    positions = int((items[:, :-1] != 0).sum())
    assert float(total / positions) == pytest.approx(float(whole), rel=1e-6)
    # Without the other rank's slots the loss differs: the gather matters.
    alone = next_item_loss(user_states[:3], item_embs[:3], items[:3], log_pop)
    assert abs(float(alone) - float(whole)) > 1e-3
    with pytest.raises(ValueError, match="reduction"):
        next_item_loss(user_states, item_embs, items, reduction="none")
