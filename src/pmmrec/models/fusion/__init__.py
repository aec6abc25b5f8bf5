"""Fusion modules: projected text and image token states -> one item vector (PMMRec §III-A).

Every fusion has the same call, ``forward(text, text_mask, image, image_mask) -> (N, D)`` with text (N, T, D),
text_mask (N, T), image (N, P, D), image_mask (N, P), masks 1 = real token. Each class also has
``from_config(cfg: ModelConfig)``. Token-level fusions live in :mod:`.attention`, vector-level ones in
:mod:`.vector`; ``model.fusion`` picks one through :data:`FUSIONS`.
"""

from __future__ import annotations

from torch import nn

from pmmrec.config import ModelConfig
from pmmrec.errors import PmmrecError
from pmmrec.models.fusion.attention import CoAttentionFusion, MergedAttentionFusion
from pmmrec.models.fusion.vector import ConcatFusion, FiLMFusion, GatedFusion, SumFusion

FUSIONS: dict[str, type[nn.Module]] = {
    "merged_attention": MergedAttentionFusion,  # paper / reference default
    "co_attention": CoAttentionFusion,
    "sum": SumFusion,
    "concat": ConcatFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
}

# Fusions that model.fusion_init (a local BERT folder) can initialise.
BERT_INITIALISABLE = frozenset({"merged_attention"})


def build_fusion(cfg: ModelConfig) -> nn.Module:
    """The fusion named by ``cfg.fusion``: random init, or (merged attention only) from ``cfg.fusion_init``."""
    if cfg.fusion not in FUSIONS:
        raise PmmrecError(f"unknown model.fusion {cfg.fusion!r}; choose one of {sorted(FUSIONS)}")
    if cfg.fusion_init is not None and cfg.fusion not in BERT_INITIALISABLE:
        # Refuse rather than ignore: a flag that is silently ignored is how the reference code went wrong.
        raise PmmrecError(f"model.fusion_init is set but model.fusion={cfg.fusion!r} cannot be initialised from "
                          f"BERT (only {sorted(BERT_INITIALISABLE)}); unset model.fusion_init")
    return FUSIONS[cfg.fusion].from_config(cfg)


__all__ = ["BERT_INITIALISABLE", "FUSIONS", "CoAttentionFusion", "ConcatFusion", "FiLMFusion", "GatedFusion",
           "MergedAttentionFusion", "SumFusion", "build_fusion"]
