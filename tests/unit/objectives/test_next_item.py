"""L_rec against a naive per-row reference that follows the PMMRec reference code literally, plus a hand example."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pmmrec.objectives import (
    log_popularity,
    next_item_loss,
    sample_negative_items,
    sampled_next_item_loss,
    window_item_mask,
)

REF_MASK = -1e4  # the reference code's mask value


def naive_next_item_loss(user_states, item_embs, items, log_pop=None, cand_embs=None, cand_items=None, offset=0):
    """One prediction at a time, one candidate at a time, as the reference's in-batch loss defines it."""
    batch, length, dim = user_states.shape
    slots = length + 1
    if cand_embs is None:
        cand_embs, cand_items, offset = item_embs.reshape(-1, dim), items.reshape(-1), 0
    terms = []
    for u in range(batch):
        window = set(items[u].tolist())
        for j in range(length):
            if items[u, j] == 0:  # padded input position: no prediction
                continue
            target = offset + u * slots + j + 1
            logits = []
            for c in range(cand_embs.shape[0]):
                item = int(cand_items[c])
                score = user_states[u, j] @ cand_embs[c]
                if log_pop is not None:
                    score = score - log_pop[item]
                if item == 0 or (item in window and c != target):
                    score = torch.tensor(REF_MASK, dtype=user_states.dtype)
                logits.append(score)
            logits = torch.stack(logits)
            terms.append(torch.logsumexp(logits, 0) - logits[target])
    return torch.stack(terms).mean()


def random_window_batch(seed, batch=5, length=6, dim=4, num_items=9, dtype=torch.float64):
    """Left-padded windows of varied lengths over a small catalogue, so items repeat within and across users."""
    gen = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items + 1, (batch, length + 1), generator=gen)
    for u in range(batch):
        real = int(torch.randint(1, length + 2, (1,), generator=gen))  # 1..L+1 real slots
        items[u, : length + 1 - real] = 0
    user_states = torch.randn(batch, length, dim, generator=gen, dtype=dtype)
    item_embs = torch.randn(batch, length + 1, dim, generator=gen, dtype=dtype)
    counts = torch.randint(1, 20, (num_items + 1,), generator=gen)
    return user_states, item_embs, items, log_popularity(counts).to(dtype)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_logq", [False, True])
def test_matches_naive_reference(seed, with_logq):
    user_states, item_embs, items, log_pop = random_window_batch(seed)
    log_pop = log_pop if with_logq else None
    got = next_item_loss(user_states, item_embs, items, log_pop)
    want = naive_next_item_loss(user_states, item_embs, items, log_pop)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_float32_matches_naive_reference():
    user_states, item_embs, items, log_pop = random_window_batch(11, dtype=torch.float32)
    want = naive_next_item_loss(user_states.double(), item_embs.double(), items, log_pop.double())
    got = next_item_loss(user_states, item_embs, items, log_pop)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_gathered_candidates_match_naive_reference(seed):
    user_states, item_embs, items, log_pop = random_window_batch(seed, batch=3, length=4)
    gen = torch.Generator().manual_seed(100 + seed)
    # Other "ranks" contribute slots before and after ours, with padding and items that clash with ours.
    before_items = torch.tensor([0, 3, 7, 1, 0, 9, 2])
    after_items = torch.tensor([4, 0, 5])
    before = torch.randn(len(before_items), 4, generator=gen, dtype=torch.float64)
    after = torch.randn(len(after_items), 4, generator=gen, dtype=torch.float64)
    cand_embs = torch.cat([before, item_embs.reshape(-1, 4), after])
    cand_items = torch.cat([before_items, items.reshape(-1), after_items])
    got = next_item_loss(user_states, item_embs, items, log_pop, cand_embs=cand_embs, cand_items=cand_items,
                         cand_offset=len(before_items))
    want = naive_next_item_loss(user_states, item_embs, items, log_pop, cand_embs, cand_items, len(before_items))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_default_candidates_equal_explicit_local_candidates():
    user_states, item_embs, items, log_pop = random_window_batch(3)
    explicit = next_item_loss(user_states, item_embs, items, log_pop, cand_embs=item_embs.reshape(-1, 4),
                              cand_items=items.reshape(-1), cand_offset=0)
    assert torch.equal(explicit, next_item_loss(user_states, item_embs, items, log_pop))


def test_hand_computed_example():
    # User 0's window is items [1, 2], user 1's is [3, 4]; L = 1, D = 2, so each user makes one prediction.
    items = torch.tensor([[1, 2], [3, 4]])
    user_states = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)  # (B, L, D)
    item_embs = torch.tensor([[[1.0, 1.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 2.0]]], dtype=torch.float64)
    # User 0 predicts slot 1 (item 2); slot 0 (item 1, in its window) is masked. Dot products with the
    # remaining slots 1, 2, 3 are 2, 0, 1. User 1 predicts slot 3 (item 4); slot 2 (item 3) is masked and the
    # dot products with slots 0, 1, 3 are 1, 0, 2. Both terms are log(e^2 + e^0 + e^1) - 2.
    want = math.log(math.exp(2) + 1 + math.exp(1)) - 2
    assert next_item_loss(user_states, item_embs, items).item() == pytest.approx(want, abs=1e-12)

    # logQ: counts 2, 1, 1, 4 for items 1..4 give p = 1/4, 1/8, 1/8, 1/2, and every logit loses log p.
    log_pop = log_popularity(np.array([0, 2, 1, 1, 4])).double()
    user0 = math.log(8 * math.exp(2) + 8 * math.exp(0) + 2 * math.exp(1)) - (2 + math.log(8))
    user1 = math.log(4 * math.exp(1) + 8 * math.exp(0) + 2 * math.exp(2)) - (2 + math.log(2))
    got = next_item_loss(user_states, item_embs, items, log_pop).item()
    assert got == pytest.approx((user0 + user1) / 2, abs=1e-6)


def test_single_user_loss_is_zero():
    # With one user every other slot holds an item of its own window, so only the target is left: p = 1.
    user_states, item_embs, items, _ = random_window_batch(0, batch=1)
    items[0] = torch.tensor([0, 0, 4, 2, 4, 7, 1])
    assert next_item_loss(user_states, item_embs, items).item() == pytest.approx(0.0, abs=1e-12)


def test_repeated_target_item_other_slots_stay_masked():
    # User 0 reads item 5 and must predict item 5 again; the other slot holding 5 (its input) stays masked,
    # and so does user 1's slot holding 5: only the target slot competes with user 1's item 6.
    items = torch.tensor([[5, 5], [5, 6]])
    user_states = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64)
    item_embs = torch.tensor([[[9.0, 0.0], [1.0, 0.0]], [[9.0, 0.0], [3.0, 0.0]]], dtype=torch.float64)
    user0 = math.log(math.exp(1) + math.exp(3)) - 1  # its target (dot 1) against user 1's item 6 (dot 3)
    user1 = 0.0  # window {5, 6}: slots 0, 1, 2 hold item 5 and are masked, so only its target is left
    got = next_item_loss(user_states, item_embs, items).item()
    assert got == pytest.approx((user0 + user1) / 2, abs=1e-12)


def test_gradcheck():
    user_states, item_embs, items, log_pop = random_window_batch(4, batch=3, length=3, dim=3)
    user_states.requires_grad_(True)
    item_embs.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, e: next_item_loss(s, e, items, log_pop), (user_states, item_embs))


def test_mostly_padding_no_nan():
    user_states, item_embs, items, log_pop = random_window_batch(5, batch=3, length=5)
    items[:] = 0
    items[:, -1] = torch.tensor([3, 4, 3])  # every window holds only its last (never padded) slot
    items[1, -2] = 4  # one prediction in the whole batch: user 1 predicts 4 from 4
    user_states.requires_grad_(True)
    loss = next_item_loss(user_states * 1e3, item_embs * 1e3, items, log_pop)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(user_states.grad).all()


def test_no_prediction_at_all_is_zero_with_gradient():
    user_states, item_embs, items, _ = random_window_batch(6, batch=2, length=3)
    items[:, :-1] = 0
    item_embs.requires_grad_(True)
    loss = next_item_loss(user_states, item_embs, items)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(item_embs.grad, torch.zeros_like(item_embs))


def test_bfloat16_is_finite_and_close():
    user_states, item_embs, items, log_pop = random_window_batch(7, dtype=torch.float32)
    full = next_item_loss(user_states, item_embs, items, log_pop)
    half = next_item_loss(user_states.bfloat16(), item_embs.bfloat16(), items, log_pop)
    assert torch.isfinite(half)
    assert half.float().item() == pytest.approx(full.item(), rel=0.05)


def test_shape_errors():
    user_states, item_embs, items, _ = random_window_batch(0)
    with pytest.raises(ValueError, match="item_embs"):
        next_item_loss(user_states, item_embs[:, 1:], items)
    with pytest.raises(ValueError, match="items"):
        next_item_loss(user_states, item_embs, items[:, 1:])
    with pytest.raises(ValueError, match="cand_offset"):
        next_item_loss(user_states, item_embs, items, cand_embs=item_embs.reshape(-1, 4),
                       cand_items=items.reshape(-1), cand_offset=1)
    with pytest.raises(ValueError, match="cand_items"):
        next_item_loss(user_states, item_embs, items, cand_embs=item_embs.reshape(-1, 4))


def test_window_item_mask():
    items = torch.tensor([[0, 2, 5], [3, 3, 1]])
    cand = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    want = torch.tensor([[1, 0, 1, 0, 0, 1, 0], [1, 1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(window_item_mask(items, cand), want)


def test_log_popularity():
    got = log_popularity(np.array([7, 2, 1, 1, 0]))  # index 0 (padding) is ignored; item 4 never seen
    want = torch.tensor([0.0, math.log(0.5), math.log(0.25), math.log(0.25), math.log(0.25)])
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32
    torch.testing.assert_close(log_popularity(torch.tensor([0, 2, 1, 1, 0]), zero_count=0.5)[4],
                               torch.tensor(math.log(0.125)))
    with pytest.raises(ValueError, match="no occurrence"):
        log_popularity(np.array([3, 0, 0]))
    with pytest.raises(ValueError, match="non-negative"):
        log_popularity(np.array([0, -1, 2]))


def naive_sampled_loss(user_states, item_embs, items, neg_embs, neg_items, log_q=None):
    batch, length, _ = user_states.shape
    terms = []
    for u in range(batch):
        window = set(items[u].tolist())
        for j in range(length):
            if items[u, j] == 0:
                continue
            h = user_states[u, j]
            logits = [h @ item_embs[u, j + 1] - (log_q[items[u, j + 1]] if log_q is not None else 0.0)]
            for emb, item in zip(neg_embs, neg_items.tolist(), strict=True):
                masked = item == 0 or item in window
                score = h @ emb - (log_q[item] if log_q is not None else 0.0)
                logits.append(torch.tensor(REF_MASK, dtype=h.dtype) if masked else score)
            logits = torch.stack(logits)
            terms.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", range(3))
def test_sampled_loss_matches_naive(seed):
    user_states, item_embs, items, log_pop = random_window_batch(seed)
    gen = torch.Generator().manual_seed(seed)
    neg_items = sample_negative_items(8, 9, log_pop, generator=gen)
    neg_items[0] = 0
    neg_embs = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    for log_q in (None, log_pop):
        got = sampled_next_item_loss(user_states, item_embs, items, neg_embs, neg_items, log_q)
        want = naive_sampled_loss(user_states, item_embs, items, neg_embs, neg_items, log_q)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sample_negative_items_range_and_popularity():
    gen = torch.Generator().manual_seed(0)
    uniform = sample_negative_items(2000, 5, generator=gen)
    assert uniform.min() >= 1 and uniform.max() <= 5
    log_pop = log_popularity(np.array([0, 1, 0, 0, 0, 99]), zero_count=1e-9)
    popular = sample_negative_items(500, 5, log_pop, generator=gen)
    assert (popular == 5).float().mean() > 0.9
