"""Vector-level fusions: pool each modality to one vector first, then combine the two vectors.

These are the late-fusion baselines of PMMRec's fusion ablation (§IV, "fusion methods"): sum, concatenation,
FiLM (Perez et al., 2018) and gating (Kiela et al., 2018). Text is mean-pooled over its valid tokens (text_mask)
and the image over its valid patches (image_mask), so padded tokens never affect the item vector.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pmmrec.config import ModelConfig
from pmmrec.models.layers import masked_mean


def pool_modalities(text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(N, T, D), (N, T), (N, P, D), (N, P) -> text vector (N, D), image vector (N, D)."""
    return masked_mean(text, text_mask), masked_mean(image, image_mask)


def _init_xavier(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        nn.init.zeros_(module.bias)


class SumFusion(nn.Module):
    """``t + v``. Parameter-free: each modality already has its own learned projection to D upstream."""

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> SumFusion:
        return cls()

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        t, v = pool_modalities(text, text_mask, image, image_mask)  # (N, D) each
        return t + v


class ConcatFusion(nn.Module):
    """``W [t; v]``: concatenation projected back to D."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)
        self.apply(_init_xavier)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ConcatFusion:
        return cls(cfg.dim)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        t, v = pool_modalities(text, text_mask, image, image_mask)  # (N, D) each
        return self.proj(torch.cat([t, v], dim=-1))  # (N, 2D) -> (N, D)


class FiLMFusion(nn.Module):
    """FiLM (Perez et al., 2018): the title conditions the image, ``gamma(t) * v + beta(t)``.

    Text modulates image, the direction the reference code uses (its ``x_film=True`` with text as ``x``).
    ``gamma`` is predicted as ``1 + delta(t)`` so that at initialisation the image vector passes through
    roughly unscaled instead of being multiplied by a near-zero random gain.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.film = nn.Linear(dim, 2 * dim)  # t -> [delta_gamma; beta]
        self.apply(_init_xavier)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> FiLMFusion:
        return cls(cfg.dim)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        t, v = pool_modalities(text, text_mask, image, image_mask)  # (N, D) each
        delta_gamma, beta = self.film(t).split(self.dim, dim=-1)  # (N, D) each
        return (1.0 + delta_gamma) * v + beta


class GatedFusion(nn.Module):
    """Gated fusion: ``g = sigmoid(W [t; v])``, output ``g * t + (1 - g) * v``.

    A per-dimension convex mix in the spirit of Kiela et al. (2018), the gating the reference code cites: the
    gate sees both modalities and picks, per dimension, how much of each to keep.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)
        self.apply(_init_xavier)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> GatedFusion:
        return cls(cfg.dim)

    def forward(self, text: Tensor, text_mask: Tensor, image: Tensor, image_mask: Tensor) -> Tensor:
        t, v = pool_modalities(text, text_mask, image, image_mask)  # (N, D) each
        g = torch.sigmoid(self.gate(torch.cat([t, v], dim=-1)))  # (N, D) in (0, 1)
        return g * t + (1.0 - g) * v
