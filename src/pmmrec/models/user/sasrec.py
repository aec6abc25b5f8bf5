"""SASRec user encoder (Kang & McAuley, ICDM 2018), PMMRec's default user encoder (§III-B).

Structure of the reference code's SASRec: item vectors plus learned position embeddings, LayerNorm and
dropout, then ``num_blocks`` post-LN transformer blocks (ReLU FFN of width 4D, bias-free attention projections,
LayerNorm eps 1e-6) under a causal + key-padding mask; Xavier-normal initialisation. Differences, all on purpose:

* positions are *right-aligned*: the last of L items always gets position ``max_seq_len - 1``. With left-padded
  sequences this makes a window shorter than ``max_seq_len`` equivalent to the same window padded to full length
  (the reference numbers positions from the left and only ever feeds full-length windows, so the two agree there);
* padded positions cannot produce NaN (see :class:`~pmmrec.models.layers.MultiHeadAttention`), padded inputs are
  zeroed before use, and the output at padded positions is exactly zero.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pmmrec.config import ModelConfig
from pmmrec.models.layers import TransformerBlock, causal_mask


class SASRec(nn.Module):
    """``forward(item_embs (B, L, D), mask (B, L)) -> (B, L, D)``; position l sees items 0..l only."""

    def __init__(self, dim: int, max_seq_len: int, num_blocks: int = 2, num_heads: int = 2, dropout: float = 0.1):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.position = nn.Embedding(max_seq_len, dim)
        self.input_norm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, num_heads, dropout, activation="relu", attn_bias=False, eps=1e-6)
            for _ in range(num_blocks))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.xavier_normal_(module.weight)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, cfg: ModelConfig, max_seq_len: int) -> SASRec:
        return cls(cfg.dim, max_seq_len, cfg.num_blocks, cfg.num_heads, cfg.dropout)

    def forward(self, item_embs: Tensor, mask: Tensor) -> Tensor:
        length = item_embs.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds the max_seq_len {self.max_seq_len} "
                             "this SASRec was built with")
        keep = (mask != 0).unsqueeze(-1)  # (B, L, 1)
        positions = torch.arange(self.max_seq_len - length, self.max_seq_len, device=item_embs.device)  # (L,)
        x = item_embs.masked_fill(~keep, 0.0) + self.position(positions)  # (B, L, D)
        x = self.dropout(self.input_norm(x))
        attn_mask = causal_mask(length, item_embs.device) & keep.transpose(1, 2)  # (B, L, L): past, real keys
        for block in self.blocks:
            x = block(x, attn_mask)  # (B, L, D)
        return x.masked_fill(~keep, 0.0)
