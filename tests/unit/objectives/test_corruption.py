"""Sequence corruption for L_NID / L_RCL: noise rate, padding, determinism, and the shuffle-span contract."""

from __future__ import annotations

import pytest
import torch

from pmmrec.objectives import corrupt


def left_padded(seed, batch=8, slots=10, num_items=50, distinct=False):
    """Left-padded sequences of varied length (including empty and one-item rows)."""
    gen = torch.Generator().manual_seed(seed)
    if distinct:  # every item of a row different, so any move of an item is visible
        items = torch.stack([torch.randperm(num_items, generator=gen)[:slots] + 1 for _ in range(batch)])
    else:
        items = torch.randint(1, num_items + 1, (batch, slots), generator=gen)
    lengths = torch.randint(0, slots + 1, (batch,), generator=gen)
    lengths[0], lengths[1], lengths[2] = 0, 1, slots
    pad = torch.arange(slots)[None, :] < (slots - lengths)[:, None]
    return items.masked_fill(pad, 0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_ratio_zero_changes_nothing(shuffle):
    items = left_padded(0)
    corrupted, changed = corrupt(items, 0.0, torch.Generator().manual_seed(1), shuffle=shuffle)
    assert torch.equal(corrupted, items) and not changed.any()


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_padding_untouched_and_changed_is_exact(shuffle, seed):
    items = left_padded(seed)
    corrupted, changed = corrupt(items, 0.5, torch.Generator().manual_seed(seed), shuffle=shuffle)
    assert corrupted.shape == items.shape and corrupted.dtype == items.dtype
    assert torch.equal(corrupted == 0, items == 0)
    assert torch.equal(changed, corrupted != items)


def test_replacements_come_from_the_batch():
    items = left_padded(3)
    corrupted, _ = corrupt(items, 1.0, torch.Generator().manual_seed(0))
    pool = set(items[items != 0].tolist())
    assert set(corrupted[corrupted != 0].tolist()) <= pool


def test_ratio_one_changes_almost_everything():
    # 4000 distinct items: a replacement draws its own item with probability 1/4000 (then it is not noise).
    items = torch.randperm(4000).reshape(100, 40) + 1
    items[:, :5] = 0
    _, changed = corrupt(items, 1.0, torch.Generator().manual_seed(0))
    rate = changed[items != 0].float().mean().item()
    assert rate > 0.995
    assert not changed[items == 0].any()


def test_same_item_draw_is_not_noise():
    items = torch.full((3, 4), 7)  # the only item in the batch: every draw returns it
    corrupted, changed = corrupt(items, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(corrupted, items) and not changed.any()


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5])
def test_empirical_rate_matches_ratio(ratio):
    gen = torch.Generator().manual_seed(0)
    items = torch.randint(1, 10**6, (400, 60), generator=gen)
    items[:, :10] = 0
    _, changed = corrupt(items, ratio, torch.Generator().manual_seed(1))
    assert changed[items != 0].float().mean().item() == pytest.approx(ratio, abs=0.015)


@pytest.mark.parametrize("shuffle", [False, True])
def test_deterministic_under_generator_and_global_rng_untouched(shuffle):
    items = left_padded(5, batch=16, slots=12)
    state = torch.get_rng_state()
    a = corrupt(items, 0.3, torch.Generator().manual_seed(42), shuffle=shuffle)
    b = corrupt(items, 0.3, torch.Generator().manual_seed(42), shuffle=shuffle)
    c = corrupt(items, 0.3, torch.Generator().manual_seed(43), shuffle=shuffle)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ratio", [0.2, 0.5, 1.0])
def test_shuffle_permutes_one_contiguous_span(seed, ratio):
    items = left_padded(seed, batch=32, slots=10, distinct=True)
    corrupted, changed = corrupt(items, ratio, torch.Generator().manual_seed(seed), shuffle=True)
    for u in range(items.shape[0]):
        real = (items[u] != 0).nonzero().flatten()
        n = real.numel()
        # The multiset of the row is kept (padding included).
        assert sorted(corrupted[u].tolist()) == sorted(items[u].tolist())
        moved = changed[u].nonzero().flatten()
        if n < 2:
            assert moved.numel() == 0
            continue
        if moved.numel() == 0:
            continue  # the random permutation happened to be the identity
        span = min(max(round(ratio * n), 2), n)
        lo, hi = int(moved.min()), int(moved.max())
        assert hi - lo + 1 <= span  # every moved position lies in one window no longer than the span
        assert items[u, lo] != 0  # ... made of real positions only
        # The window's items are a permutation of the same window's clean items.
        assert sorted(corrupted[u, lo:hi + 1].tolist()) == sorted(items[u, lo:hi + 1].tolist())


def test_shuffle_actually_shuffles():
    gen = torch.Generator().manual_seed(0)
    # Full rows of distinct items.
    items = torch.stack([torch.randperm(50, generator=gen)[:10] + 1 for _ in range(64)])  # (64, 10)
    # A span of 5 distinct items: the drawn permutation is the identity with probability 1/120.
    _, changed = corrupt(items, 0.5, torch.Generator().manual_seed(0), shuffle=True)
    assert (changed.any(dim=1)).float().mean() > 0.9


def test_shuffle_spans_vary():
    # Over many draws the span start varies: ratio 0.2 on 10 items gives a 2-item span with 9 possible starts.
    items = torch.arange(1, 11).repeat(500, 1)
    _, changed = corrupt(items, 0.2, torch.Generator().manual_seed(0), shuffle=True)
    moved_rows = changed.any(dim=1)
    starts = changed[moved_rows].float().argmax(dim=1)
    assert set(starts.tolist()) == set(range(9))
    assert torch.all(changed[moved_rows].sum(dim=1) == 2)


def test_int32_and_all_padding():
    items = torch.zeros(3, 5, dtype=torch.int32)
    for shuffle in (False, True):
        corrupted, changed = corrupt(items, 0.5, torch.Generator().manual_seed(0), shuffle=shuffle)
        assert corrupted.dtype == torch.int32 and not changed.any()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        corrupt(torch.ones(2, 3, dtype=torch.long), 1.5)
    with pytest.raises(ValueError):
        corrupt(torch.ones(2, 3), 0.5)
