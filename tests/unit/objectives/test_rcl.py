"""L_RCL against a naive per-anchor reference, plus a hand-computed two-user example."""

from __future__ import annotations

import math

import pytest
import torch

from pmmrec.objectives import rcl_loss


def naive_rcl_loss(clean, corrupted, tau=0.1, targets=None):
    """Each anchor's positive is the other view of its user; both views of every other user are negatives,
    except (with ``targets``) users with the same next item."""
    clean = torch.nn.functional.normalize(clean, dim=-1)
    corrupted = torch.nn.functional.normalize(corrupted, dim=-1)
    batch = clean.shape[0]
    terms = []
    for anchors, partners in ((clean, corrupted), (corrupted, clean)):
        for u in range(batch):
            pos = torch.exp(anchors[u] @ partners[u] / tau)
            den = pos
            for w in range(batch):
                if w != u and (targets is None or targets[w] != targets[u]):
                    den = den + torch.exp(anchors[u] @ clean[w] / tau)
                    den = den + torch.exp(anchors[u] @ corrupted[w] / tau)
            terms.append(-torch.log(pos / den))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = 2 + seed
    clean = torch.randn(batch, 6, generator=gen, dtype=torch.float64)
    corrupted = clean + 0.5 * torch.randn(batch, 6, generator=gen, dtype=torch.float64)
    tau = 0.05 + 0.1 * seed
    torch.testing.assert_close(rcl_loss(clean, corrupted, tau), naive_rcl_loss(clean, corrupted, tau),
                               atol=1e-5, rtol=1e-5)


def test_hand_example():
    tau, c = 0.5, 1 / math.sqrt(2)
    clean = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    corrupted = torch.tensor([[1.0, 1.0], [0.0, -3.0]])

    def term(pos, negs):
        return -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + sum(math.exp(n / tau) for n in negs)))

    want = (term(c, [-1.0, 0.0])  # clean_0: positive corrupted_0; negatives clean_1, corrupted_1
            + term(c, [-c, -c])  # corrupted_0: positive clean_0
            + term(0.0, [-1.0, -c])  # clean_1: positive corrupted_1; negatives clean_0, corrupted_0
            + term(0.0, [0.0, -c])) / 4  # corrupted_1: positive clean_1
    assert rcl_loss(clean, corrupted, tau).item() == pytest.approx(want, abs=1e-6)


def test_single_user_is_zero_with_graph():
    clean = torch.randn(1, 4, requires_grad=True)
    corrupted = torch.randn(1, 4, requires_grad=True)
    loss = rcl_loss(clean, corrupted)
    loss.backward()
    assert loss.item() == 0.0
    assert clean.grad is not None and torch.equal(clean.grad, torch.zeros_like(clean))


def test_gradcheck():
    gen = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    corrupted = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rcl_loss(a, b, 0.2), (clean, corrupted))


def test_identical_views_are_finite():
    # Every vector equal and a tiny temperature: all logits tie at 1/tau, the loss is log(2B - 1).
    clean = torch.ones(4, 3, requires_grad=True)
    loss = rcl_loss(clean, clean.clone(), tau=1e-3)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(7), rel=1e-5)
    assert torch.isfinite(clean.grad).all()


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        rcl_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError):
        rcl_loss(torch.randn(3, 4), torch.randn(3, 4), tau=0.0)


@pytest.mark.parametrize("seed", range(4))
def test_users_with_the_same_next_item_are_not_negatives(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = 4 + seed
    clean = torch.randn(batch, 5, generator=gen, dtype=torch.float64)
    corrupted = clean + 0.3 * torch.randn(batch, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(1, 3, (batch,), generator=gen)  # few distinct items: many shared targets
    got = rcl_loss(clean, corrupted, 0.2, targets)
    torch.testing.assert_close(got, naive_rcl_loss(clean, corrupted, 0.2, targets), atol=1e-6, rtol=1e-6)
    distinct = torch.arange(batch)  # all targets differ: the plain loss
    torch.testing.assert_close(rcl_loss(clean, corrupted, 0.2, distinct), rcl_loss(clean, corrupted, 0.2))
    assert not torch.isclose(got, rcl_loss(clean, corrupted, 0.2)) or len(set(targets.tolist())) == batch
