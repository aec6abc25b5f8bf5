"""L_NID against a naive per-position reference, plus a hand-computed three-position example."""

from __future__ import annotations

import math

import pytest
import torch

from pmmrec.objectives import nid_loss


def naive_nid_loss(logits, changed, mask):
    terms = []
    for b in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if mask[b, j]:
                p = torch.sigmoid(logits[b, j])
                terms.append(-torch.log(p) if changed[b, j] else -torch.log(1 - p))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(4, 7, generator=gen, dtype=torch.float64)
    changed = torch.rand(4, 7, generator=gen) < 0.3
    mask = torch.rand(4, 7, generator=gen) < 0.7
    mask[0, 0] = True
    torch.testing.assert_close(nid_loss(logits, changed, mask), naive_nid_loss(logits, changed, mask),
                               atol=1e-5, rtol=1e-5)


def test_hand_example():
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0]])
    changed = torch.tensor([[False, True, False, True]])
    mask = torch.tensor([[True, True, True, False]])  # the last position is padding and does not count
    want = (math.log(2) + math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 3
    assert nid_loss(logits, changed, mask).item() == pytest.approx(want, abs=1e-6)


def test_no_valid_position_is_zero_with_graph():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = nid_loss(logits, torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_extreme_logits_are_finite():
    logits = torch.tensor([[1e4, -1e4, 1e4]], requires_grad=True)
    loss = nid_loss(logits, torch.tensor([[False, True, True]]), torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_gradcheck():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    changed = torch.tensor([[True, False, False, True], [False, False, True, True]])
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    assert torch.autograd.gradcheck(lambda x: nid_loss(x, changed, mask), (logits,))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        nid_loss(torch.randn(2, 3), torch.zeros(2, 4, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool))
