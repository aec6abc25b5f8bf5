"""Shared layers: masked mean, causal mask, attention against a naive reference, the post-LN block."""

from __future__ import annotations

import math

import pytest
import torch

from pmmrec.models.layers import MultiHeadAttention, TransformerBlock, causal_mask, masked_mean


def test_masked_mean_hand_computed():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                      [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])  # (2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert torch.equal(masked_mean(x, mask), torch.tensor([[2.0, 3.0], [9.0, 10.0]]))


def test_masked_mean_empty_row_is_zero_and_padding_cannot_leak_nan():
    x = torch.tensor([[[1.0], [float("nan")]], [[float("inf")], [2.0]]])  # (2, 2, 1)
    mask = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)
    assert torch.equal(masked_mean(x, mask), torch.tensor([[1.0], [0.0]]))


def test_causal_mask():
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3), expected)


def _naive_attention(attn: MultiHeadAttention, x, context, mask):
    """Per-head loop with an explicit softmax; rows with no allowed key give zero before the output map."""
    b, lq, d = x.shape
    h = attn.num_heads
    dh = d // h
    q, k, v = attn.q(x), attn.k(context), attn.v(context)
    out = torch.zeros(b, lq, d)
    for i in range(b):
        for head in range(h):
            sl = slice(head * dh, (head + 1) * dh)
            scores = q[i, :, sl] @ k[i, :, sl].T / math.sqrt(dh)  # (Lq, Lk)
            scores = scores.masked_fill(~mask[i], float("-inf"))
            for row in range(lq):
                if mask[i, row].any():
                    out[i, row, sl] = torch.softmax(scores[row], dim=-1) @ v[i, :, sl]
    return attn.out(out)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_naive_reference(cross):
    torch.manual_seed(0)
    attn = MultiHeadAttention(dim=8, num_heads=2).eval()
    x = torch.randn(2, 4, 8)
    context = torch.randn(2, 5, 8) if cross else x
    mask = torch.rand(2, 4, context.shape[1]) > 0.4
    mask[0, 1] = False  # one query row with no key at all
    got = attn(x, mask, context if cross else None)
    assert torch.allclose(got, _naive_attention(attn, x, context, mask), atol=1e-5)
    assert torch.isfinite(got).all()


def test_fully_masked_rows_give_no_nan_and_no_gradient_nan():
    torch.manual_seed(0)
    block = TransformerBlock(dim=8, num_heads=2, dropout=0.0)
    x = torch.randn(2, 3, 8, requires_grad=True)
    mask = torch.zeros(2, 3, 3, dtype=torch.bool)
    out = block(x, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_block_is_post_ln():
    """Each sublayer's output is LayerNormed: with unit/zero LN parameters every position has mean 0, var 1."""
    torch.manual_seed(0)
    block = TransformerBlock(dim=16, num_heads=4, dropout=0.0, activation="relu", attn_bias=False, eps=1e-6)
    out = block(torch.randn(3, 5, 16), causal_mask(5))
    assert torch.allclose(out.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3)
    assert block.attn.q.bias is None and block.ffn_in.bias is not None


def test_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(dim=10, num_heads=3)
