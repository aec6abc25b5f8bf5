"""L_rec over the whole catalogue against a naive per-position loop; blocks with recomputation change nothing."""

from __future__ import annotations

import math

import pytest
import torch

from pmmrec.objectives.catalogue import catalogue_next_item_loss
from pmmrec.objectives.next_item import sample_negative_items, sampled_next_item_loss


def _naive(states, items, cand):
    """Per position: softmax over every item except padding and the window's other items."""
    losses = []
    for u in range(items.shape[0]):
        window = set(items[u].tolist())
        for j in range(items.shape[1] - 1):
            if items[u, j] == 0:
                continue
            target = int(items[u, j + 1])
            allowed = [c for c in range(1, cand.shape[0]) if c == target or c not in window]
            logits = torch.stack([states[u, j] @ cand[c] for c in allowed])
            losses.append(torch.logsumexp(logits, 0) - states[u, j] @ cand[target])
    return torch.stack(losses).mean()


def _example(seed=0, batch=3, length=4, items=9, dim=5):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, dim, generator=g, requires_grad=True)
    cand = torch.randn(items + 1, dim, generator=g)
    cand[0] = 0
    cand.requires_grad_(True)
    windows = torch.randint(1, items + 1, (batch, length + 1), generator=g)
    windows[0, :2] = 0  # left padding
    windows[1, 1] = windows[1, 3]  # a repeated item
    return states, windows, cand


def test_matches_the_naive_loop():
    states, items, cand = _example()
    got = catalogue_next_item_loss(states, items, cand)
    want = _naive(states, items, cand)
    assert torch.allclose(got, want, atol=1e-5)
    g_got = torch.autograd.grad(got, (states, cand))
    g_want = torch.autograd.grad(_naive(states, items, cand), (states, cand))
    for a, b in zip(g_got, g_want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_hand_example():
    # One user, window [1, 2]: position 0 predicts item 2 among items 2 and 3 (1 is in the window, 0 is padding).
    states = torch.tensor([[[1.0, 0.0]]])
    cand = torch.tensor([[0.0, 0.0], [5.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    loss = catalogue_next_item_loss(states, torch.tensor([[1, 2]]), cand)
    assert loss.item() == pytest.approx(math.log(math.exp(2) + math.exp(1)) - 2, rel=1e-6)


def test_blocks_with_recomputation_give_the_same_loss_and_gradients():
    states, items, cand = _example(seed=3, batch=5, length=6, items=40)
    whole = catalogue_next_item_loss(states, items, cand, reduction="sum")
    grads = torch.autograd.grad(whole, (states, cand))
    blocked = catalogue_next_item_loss(states, items, cand, reduction="sum", max_block=41 * 3)  # 3 rows a block
    assert torch.allclose(whole, blocked, atol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(blocked, (states, cand)), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_no_position_gives_a_zero_that_keeps_the_graph():
    states, _, cand = _example()
    loss = catalogue_next_item_loss(states, torch.zeros(3, 5, dtype=torch.long), cand)
    assert loss.item() == 0.0
    loss.backward()
    assert states.grad is not None and cand.grad is not None


def test_sampled_sum_is_the_mean_times_the_positions():
    states, items, cand = _example(seed=5)
    negs = sample_negative_items(6, 9, generator=torch.Generator().manual_seed(0))
    embs = cand[items]
    mean = sampled_next_item_loss(states, embs, items, cand[negs], negs)
    total = sampled_next_item_loss(states, embs, items, cand[negs], negs, reduction="sum")
    assert total.item() == pytest.approx(mean.item() * int((items[:, :-1] != 0).sum()), rel=1e-5)
