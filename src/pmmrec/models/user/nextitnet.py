"""NextItNet user encoder (Yuan et al., WSDM 2019), one of PMMRec's alternative user encoders (§IV).

A stack of residual blocks of dilated *causal* 1-D convolutions over the item sequence, D channels, kernel 3.
As in the reference code we use the paper's residual block (b): ``conv(d) -> LN -> ReLU -> conv(2d) -> LN ->
ReLU``, plus the input; block dilations cycle ``[1, 4]`` (so the two convolutions of successive blocks dilate
1, 2, 4, 8, 1, 2, ...), ``num_blocks`` cycles in all. Causality comes from padding each convolution on the left
only. Unlike the reference, activations at padded positions are re-zeroed after every convolution: the zero
left-padding of the convolutions and the sequence's own left padding then look identical, so prepending more
padding leaves every real position's state unchanged. NextItNet has no dropout (neither has the reference), so
``model.dropout`` does not apply to it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pmmrec.config import ModelConfig

DILATIONS = (1, 4)  # one cycle of block dilations (the reference's residual block (b) setting)


class CausalConv1d(nn.Module):
    """(B, L, D) -> (B, L, D); output position l depends on inputs l, l - d, ..., l - (k - 1) d only."""

    def __init__(self, dim: int, kernel_size: int, dilation: int):
        super().__init__()
        self.left_pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(dim, dim, kernel_size, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        x = F.pad(x.transpose(1, 2), (self.left_pad, 0))  # (B, D, pad + L): zeros before the sequence only
        return self.conv(x).transpose(1, 2)  # (B, L, D)


class ResidualBlock(nn.Module):
    """NextItNet residual block (b): two causal convolutions, dilations d and 2d, each followed by LN and ReLU."""

    def __init__(self, dim: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv1 = CausalConv1d(dim, kernel_size, dilation)
        self.norm1 = nn.LayerNorm(dim, eps=1e-8)
        self.conv2 = CausalConv1d(dim, kernel_size, 2 * dilation)
        self.norm2 = nn.LayerNorm(dim, eps=1e-8)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x (B, L, D), zero at padded positions; keep (B, L, 1) bool -> (B, L, D), zero at padded positions."""
        h = F.relu(self.norm1(self.conv1(x))).masked_fill(~keep, 0.0)  # (B, L, D)
        h = F.relu(self.norm2(self.conv2(h))).masked_fill(~keep, 0.0)
        return x + h


class NextItNet(nn.Module):
    """``forward(item_embs (B, L, D), mask (B, L)) -> (B, L, D)``; position l sees items 0..l only."""

    def __init__(self, dim: int, num_blocks: int = 2, kernel_size: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock(dim, kernel_size, dilation) for dilation in DILATIONS * num_blocks)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # The reference's init touches only Linear/Embedding, which NextItNet lacks, so its convolutions keep
        # PyTorch's default; we use Xavier-normal like the other user encoders, with zero biases.
        if isinstance(module, nn.Conv1d):
            nn.init.xavier_normal_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, cfg: ModelConfig, max_seq_len: int) -> NextItNet:
        return cls(cfg.dim, cfg.num_blocks)  # convolutions need no max_seq_len

    def forward(self, item_embs: Tensor, mask: Tensor) -> Tensor:
        keep = (mask != 0).unsqueeze(-1)  # (B, L, 1)
        x = item_embs.masked_fill(~keep, 0.0)  # (B, L, D)
        for block in self.blocks:
            x = block(x, keep)
        return x
