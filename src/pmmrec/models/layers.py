"""Building blocks shared by more than one model part: masked mean pooling, causal masks, a transformer block.

The transformer block serves both the token-level fusions (PMMRec §III-A, "merged attention" over text and image
tokens) and the SASRec user encoder (PMMRec §III-B). Both the reference SASRec and BERT are *post-LN*
(``LayerNorm(x + sublayer(x))``), so this block is post-LN too; that is also what lets a BERT layer be copied into
it unchanged (:meth:`pmmrec.models.fusion.attention.MergedAttentionFusion.load_bert_layer`).

Attention masks are boolean, ``True`` = "this query may attend to this key", broadcastable to ``(B, Lq, Lk)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Activation of the feed-forward sublayer, by name: SASRec uses ReLU, BERT (and so the fusion layer) exact GELU.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` (N, T, D) over the positions where ``mask`` (N, T) is non-zero -> (N, D).

    A row with no valid position gives a zero vector, not NaN. Masked positions are excluded with ``where``
    rather than multiplied by zero, so that even non-finite values in padding cannot leak into the mean.
    """
    keep = (mask != 0).unsqueeze(-1)  # (N, T, 1)
    total = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)  # (N, D)
    count = keep.sum(dim=1).clamp(min=1).to(x.dtype)  # (N, 1)
    return total / count


def causal_mask(length: int, device: torch.device | str | None = None) -> Tensor:
    """(L, L) boolean mask, ``True`` on and below the diagonal: position l may attend to positions 0..l."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with separate Q/K/V/output projections (Vaswani et al., 2017).

    Keys and values come from ``context`` (cross-attention) or from the queries themselves (self-attention).
    A query row whose mask allows no key at all (a left-padding position under a causal mask, an item whose
    other modality is entirely masked) would make the softmax NaN; such rows are given a harmless full row for
    the softmax and their output is set to zero, so padding never produces NaN and never reaches valid rows.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        b, length, dim = x.shape
        return x.view(b, length, self.num_heads, dim // self.num_heads).transpose(1, 2)  # (B, H, L, D/H)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` (B, Lq, D) attends to ``context`` (B, Lk, D; default ``x``) where ``mask`` allows -> (B, Lq, D)."""
        context = x if context is None else context
        q = self._split_heads(self.q(x))  # (B, H, Lq, D/H)
        k, v = self._split_heads(self.k(context)), self._split_heads(self.v(context))  # (B, H, Lk, D/H)
        allowed = mask.bool()
        if allowed.dim() == 3:
            allowed = allowed.unsqueeze(1)  # (B, 1, Lq|1, Lk): the same mask for every head
        empty = ~allowed.any(dim=-1, keepdim=True)  # (B, 1, Lq|1, 1) rows that may attend to nothing
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty,
                                              dropout_p=self.dropout if self.training else 0.0)  # (B, H, Lq, D/H)
        attn = attn.masked_fill(empty, 0.0)
        b, _, length, _ = attn.shape
        return self.out(attn.transpose(1, 2).reshape(b, length, -1))  # (B, Lq, D)


class TransformerBlock(nn.Module):
    """One post-LN transformer layer: ``x = LN(x + Attn(x)); x = LN(x + FFN(x))``.

    The same layout as BERT's ``BertLayer`` and as the reference SASRec block; dropout is applied to the
    attention probabilities and to each sublayer's output before the residual sum. With ``context`` the
    attention is cross-attention (the co-attention fusion); the FFN always reads the query stream.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1, ffn_dim: int | None = None,
                 activation: str = "gelu", attn_bias: bool = True, eps: float = 1e-12):
        super().__init__()
        ffn_dim = 4 * dim if ffn_dim is None else ffn_dim
        self.attn = MultiHeadAttention(dim, num_heads, dropout, bias=attn_bias)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.act = ACTIVATIONS[activation]()
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` (B, L, D), boolean ``mask`` broadcastable to (B, L, Lk) -> (B, L, D)."""
        x = self.attn_norm(x + self.dropout(self.attn(x, mask, context)))  # (B, L, D)
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))  # (B, L, D)
