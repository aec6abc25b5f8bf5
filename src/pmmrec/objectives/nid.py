"""L_NID, the noised item detection loss of PMMRec (Li et al., ICDE 2024; docs/design.md §5).

The paper names the objective; how the noise is made and scored is **our design**: a sequence corrupted by
:func:`pmmrec.objectives.corrupt` is read by the user encoder, :class:`pmmrec.objectives.NoiseClassifier` maps
each output state to a logit, and a binary cross-entropy against "the item at this position actually changed"
is averaged over the non-padded positions.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from pmmrec.objectives.base import Objective
from pmmrec.objectives.heads import NoiseClassifier

__all__ = ["nid_loss"]


def nid_loss(logits: Tensor, changed: Tensor, mask: Tensor) -> Tensor:
    """L_NID: binary cross-entropy with logits over non-padded positions (our design; PMMRec, ICDE 2024).

    Args:
        logits: ``(B, L)`` noise logits on the user encoder's states over the *corrupted* sequence.
        changed: ``(B, L)`` bool labels, True where corruption changed the item.
        mask: ``(B, L)`` bool, True at non-padded positions (the only ones that count).

    Returns:
        A scalar: the mean over masked positions. Every masked position weighs the same, so users with longer
        sequences contribute more, as in L_rec. With no masked position it is a zero that keeps the graph,
        so that backward() and DDP still see the classifier's parameters.
    """
    if logits.dim() != 2 or changed.shape != logits.shape or mask.shape != logits.shape:
        raise ValueError(f"logits, changed and mask must all be (B, L); got {tuple(logits.shape)}, "
                         f"{tuple(changed.shape)} and {tuple(mask.shape)}")
    mask = mask.bool()
    if not bool(mask.any()):
        return logits.sum() * 0.0
    targets = changed[mask].to(logits.dtype)  # (V,)
    return F.binary_cross_entropy_with_logits(logits[mask], targets)


def nid_term(out, batch) -> Tensor:
    """L_NID on the step's corrupted view (shared with L_RCL)."""
    noisy_states, changed = out.corrupted(batch)
    return nid_loss(out.model.heads["nid"](noisy_states).float(), changed, out.mask)


def nid_heads(config, item_encoder) -> dict:
    return {"nid": NoiseClassifier(config.model.dim)}


OBJECTIVE = Objective("nid", nid_term, nid_heads, section="nid")
