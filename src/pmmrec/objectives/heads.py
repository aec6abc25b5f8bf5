"""Small trainable heads used only by the auxiliary objectives of PMMRec (Li et al., ICDE 2024; docs/design.md §5).

The losses in this package are plain functions of tensors; the few parameters they need live here as modules
that the model owns, so that they are saved, loaded, moved and wrapped (DDP) together with it.

* :class:`ContrastiveHead` projects the pooled text and image vectors of each item before L_NICL, as the
  paper's cross-modal contrastive learning does (the projection keeps the contrastive geometry from
  constraining the representations that are fused and fed to the user encoder, as in SimCLR/CLIP training).
* :class:`NoiseClassifier` is the per-position "was this item noised?" classifier of L_NID (our design).
"""

from __future__ import annotations

from torch import Tensor, nn

from pmmrec.config import NiclConfig

__all__ = ["ContrastiveHead", "NoiseClassifier"]


class ContrastiveHead(nn.Module):
    """L_NICL projection head: ``Linear(D, D) -> GELU -> Linear(D, D)``, or the identity when disabled.

    Args:
        dim: the width ``D`` of the item vectors.
        enabled: False (``NiclConfig.head = False``, an ablation) makes the head a parameter-free identity.
    """

    def __init__(self, dim: int, enabled: bool = True):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.enabled = enabled
        self.net: nn.Module = (nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)) if enabled
                               else nn.Identity())

    @classmethod
    def from_config(cls, dim: int, cfg: NiclConfig) -> ContrastiveHead:
        """The head that ``cfg.head`` asks for."""
        return cls(dim, enabled=cfg.head)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D) -> (..., D)``."""
        return self.net(x)


class NoiseClassifier(nn.Module):
    """L_NID per-position binary classifier (our design, docs/design.md §5): ``Linear(D, 1)`` on encoder states.

    Its output are logits of "the item at this position was changed by the corruption"; feed them with the
    labels from :func:`pmmrec.objectives.corrupt` to :func:`pmmrec.objectives.nid_loss`.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.proj = nn.Linear(dim, 1)

    def forward(self, states: Tensor) -> Tensor:
        """``states (B, L, D) -> logits (B, L)``."""
        return self.proj(states).squeeze(-1)  # (B, L)
