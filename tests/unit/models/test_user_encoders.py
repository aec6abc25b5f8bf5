"""User encoders: shapes, causality ("future items don't leak"), left-padding invariance, gradients, registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pmmrec.config import ModelConfig
from pmmrec.errors import PmmrecError
from pmmrec.models.user import USER_ENCODERS, build_user_encoder

D, L, MAX_LEN = 16, 6, 8
ALL = sorted(USER_ENCODERS)


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: extra intra-op threads only add contention (3x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_user_encoder(ModelConfig(dim=D, user_encoder=name, num_blocks=2, num_heads=2), MAX_LEN)


def _batch(seed: int = 1):
    """Three left-padded sequences of length L: partly padded, full, a single item."""
    g = torch.Generator().manual_seed(seed)
    embs = torch.randn(3, L, D, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    return embs, mask


@pytest.mark.parametrize("name", ALL)
def test_shape_finite_and_zero_at_padding(name):
    encoder = _build(name).train()
    embs, mask = _batch()
    embs = torch.cat([embs, torch.randn(1, L, D)])  # plus a user with no items at all
    mask = torch.cat([mask, torch.zeros(1, L, dtype=torch.bool)])
    states = encoder(embs, mask)
    assert states.shape == (4, L, D)
    assert torch.isfinite(states).all()
    assert (states[~mask] == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_accepts_integer_masks(name):
    encoder = _build(name).eval()
    embs, mask = _batch()
    assert torch.equal(encoder(embs, mask), encoder(embs, mask.long()))


@pytest.mark.parametrize("name", ALL)
def test_every_parameter_gets_a_gradient(name):
    encoder = _build(name).train()
    encoder(*_batch()).square().sum().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


@pytest.mark.parametrize("name", ALL)
def test_future_items_do_not_leak(name):
    encoder = _build(name).eval()
    embs, mask = _batch()
    base = encoder(embs, mask)
    for pos in range(L - 1):
        perturbed = embs.clone()
        perturbed[:, pos + 1:] += 10 * torch.randn(3, L - pos - 1, D)
        out = encoder(perturbed, mask)
        assert torch.allclose(out[:, :pos + 1], base[:, :pos + 1], atol=1e-5), f"position {pos} sees the future"
        assert not torch.allclose(out[:, pos + 1:], base[:, pos + 1:], atol=1e-4)  # the future itself does change


@pytest.mark.parametrize("name", ALL)
def test_garbage_in_padded_slots_is_ignored(name):
    encoder = _build(name).eval()
    embs, mask = _batch()
    garbage = torch.where(mask.unsqueeze(-1), embs, 1e4 * torch.randn_like(embs))
    garbage[0, 0, 0] = float("nan")
    assert torch.allclose(encoder(garbage, mask), encoder(embs, mask), atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_prepending_padding_does_not_change_real_states(name):
    encoder = _build(name).eval()
    embs, mask = _batch()
    extra = MAX_LEN - L  # SASRec's positions are right-aligned, so windows up to max_seq_len are comparable
    longer = torch.cat([torch.randn(3, extra, D), embs], dim=1)
    longer_mask = torch.cat([torch.zeros(3, extra, dtype=torch.bool), mask], dim=1)
    assert torch.allclose(encoder(longer, longer_mask)[:, extra:], encoder(embs, mask), atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_given_the_seed(name):
    first, second = _build(name), _build(name)
    second_state = second.state_dict()
    for key, value in first.state_dict().items():
        assert torch.equal(value, second_state[key]), key


@pytest.mark.parametrize("name", ALL)
def test_learns_next_item_prediction(name):
    """In-batch next-item softmax on a fixed toy set of sequences: the loss goes down."""
    encoder = _build(name).train()
    g = torch.Generator().manual_seed(5)
    items = torch.randn(10, D, generator=g)  # a catalogue of 10 fixed item vectors
    seqs = torch.randint(0, 10, (8, L + 1), generator=g)  # (B, L+1): inputs and next-item targets
    mask = torch.ones(8, L, dtype=torch.bool)
    mask[:4, :2] = False  # some left padding
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        states = encoder(items[seqs[:, :-1]], mask)  # (B, L, D)
        logits = states[mask] @ items.T  # (valid positions, 10)
        loss = nn.functional.cross_entropy(logits, seqs[:, 1:][mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_sasrec_rejects_sequences_longer_than_max_seq_len():
    encoder = _build("sasrec")
    with pytest.raises(ValueError, match="exceeds the max_seq_len"):
        encoder(torch.randn(1, MAX_LEN + 1, D), torch.ones(1, MAX_LEN + 1))


def test_nextitnet_dilations():
    encoder = _build("nextitnet")
    dilations = [(b.conv1.conv.dilation[0], b.conv2.conv.dilation[0]) for b in encoder.blocks]
    assert dilations == [(1, 2), (4, 8), (1, 2), (4, 8)]  # [1, 4] x num_blocks, second conv doubled


def test_unknown_user_encoder_lists_choices():
    with pytest.raises(PmmrecError, match="unknown model.user_encoder 'bert4rec'.*gru4rec.*nextitnet.*sasrec"):
        build_user_encoder(ModelConfig(user_encoder="bert4rec"), MAX_LEN)
