"""L_RCL, the robustness-aware contrastive loss of PMMRec (Li et al., ICDE 2024; docs/design.md §5).

The paper names the objective; its exact form is **our design**: the user representation of a clean sequence
and of its corrupted view (the same corruption as L_NID, from :func:`pmmrec.objectives.corrupt`) form a
positive pair, and both views of every other user in the batch are negatives (NT-Xent, as in SimCLR).
Pulling the two views together makes the user encoder robust to the noise that L_NID learns to detect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pmmrec.objectives.base import Objective
from pmmrec.objectives.heads import ContrastiveHead

__all__ = ["rcl_loss"]


def rcl_loss(clean: Tensor, corrupted: Tensor, tau: float = 0.5, targets: Tensor | None = None) -> Tensor:
    """L_RCL: symmetric InfoNCE between clean and corrupted user views (our design; PMMRec, ICDE 2024).

    For the anchor ``clean_u`` the positive is ``corrupted_u``; the negatives are ``clean_w`` and
    ``corrupted_w`` for every other user ``w != u``. Corrupted anchors likewise (positive ``clean_u``). The
    loss is the mean over all ``2B`` anchors of ``-log softmax`` of the positive, with cosine similarities
    divided by ``tau``.

    Args:
        clean: ``(B, D)`` user representations (last position) of the clean sequences.
        corrupted: ``(B, D)`` the same for the corrupted sequences; both are l2-normalised here.
        tau: temperature (``RclConfig.tau``).
        targets: optional ``(B,)`` next-item ids. Users with the same next item are in the same state as far as
            L_rec is concerned, so neither view of one is a negative for the other (false negatives would push
            apart user vectors that next-item prediction needs close).

    Returns:
        A scalar. With ``B = 1`` there is no negative and the loss is a zero that keeps the graph.
    """
    if clean.dim() != 2 or clean.shape != corrupted.shape:
        raise ValueError(f"clean and corrupted must both be (B, D), got {tuple(clean.shape)} and "
                         f"{tuple(corrupted.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    batch = clean.shape[0]
    if batch < 2:
        # No negative: every softmax would be over the positive alone (loss exactly 0); say so without
        # computing it, but keep both inputs in the graph for backward() and DDP.
        return (clean.sum() + corrupted.sum()) * 0.0

    views = F.normalize(torch.cat([clean, corrupted], dim=0), dim=-1)  # (2B, D): clean rows, then corrupted
    logits = views @ views.t() / tau  # (2B, 2B)
    # An anchor is not its own candidate; the dtype's min (not -inf) keeps every softmax finite and exact.
    excluded = torch.eye(2 * batch, dtype=torch.bool, device=logits.device)  # (2B, 2B)
    rows = torch.arange(2 * batch, device=logits.device)
    positives = (rows + batch) % (2 * batch)  # (2B,) clean_u <-> corrupted_u
    if targets is not None:
        same = targets.reshape(-1).repeat(2)  # (2B,): the next item of each view's user
        excluded |= same[:, None] == same[None, :]
        excluded[rows, positives] = False  # the positive itself stays
    logits = logits.masked_fill(excluded, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, positives)


def rcl_term(out, batch) -> Tensor:
    """L_RCL between the last clean state and the last state of the corrupted view (shared with L_NID)."""
    cfg = out.config.rcl
    noisy_states, _ = out.corrupted(batch)
    head = out.model.heads["rcl"]
    return rcl_loss(head(out.states[:, -1]).float(), head(noisy_states[:, -1]).float(), cfg.tau,
                    batch.items[:, -1] if cfg.mask_same_target else None)


def rcl_heads(config, item_encoder) -> dict:
    return {"rcl": ContrastiveHead(config.model.dim, enabled=config.objectives.rcl.head)}


OBJECTIVE = Objective("rcl", rcl_term, rcl_heads, section="rcl")
