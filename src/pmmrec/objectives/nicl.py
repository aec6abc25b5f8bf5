"""L_NICL, the next-item enhanced cross-modal contrastive loss of PMMRec (Li et al., "Multi-Modality is All
You Need for Transferable Recommender Systems", ICDE 2024; docs/design.md §5).

The paper aligns the text and image views of items and, beyond the plain cross-modal pair, treats the *next*
item of a user's sequence as a positive too, so that the two modalities also agree on sequential transitions.
Its body is not available to us; the exact positive/negative sets below follow docs/design.md §5, and the
treatment of several positives is **our design** (see :func:`nicl_loss`).

For the item slot ``l`` of user ``u`` with (projected, l2-normalised) text vector ``t_{u,l}`` and image vector
``v_{u,l}``, the anchor ``t_{u,l}`` has

* positives ``P``: ``v_{u,l}``, and, when slot ``l + 1`` of ``u`` holds a real item, ``t_{u,l+1}`` and
  ``v_{u,l+1}`` (next-item positives, both modalities);
* negatives ``N``: the text *and* image vectors (inter- and intra-modality negatives) of every slot of every
  *other* user whose item differs from the positives' items ``items[u,l]`` and ``items[u,l+1]``;
* excluded: the anchor itself, every other slot of the same user (they are neither clearly similar nor clearly
  different), and any candidate holding a positive's item (a false negative), wherever it is.

Image anchors are symmetric (positives ``t_{u,l}``, ``t_{u,l+1}``, ``v_{u,l+1}``), and the loss is the mean
over the valid (non-padding) slots of both modalities. With ``next_item_positives=False`` the only positive is
the same item's other modality and the negative set is built by the same rules, which makes the ablation a
CLIP-style alignment that differs from the full loss in its positives alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pmmrec.errors import ConfigError
from pmmrec.objectives.base import Objective
from pmmrec.objectives.heads import ContrastiveHead

__all__ = ["nicl_loss"]


def _next_slot(items: Tensor, user: Tensor, pos: Tensor) -> Tensor:
    """``(M,)`` index, among the ``M`` valid slots, of the slot after each one; -1 at padding or the end."""
    batch, slots = items.shape
    num = user.shape[0]
    slot_index = torch.full((batch, slots + 1), -1, dtype=torch.long, device=items.device)  # (B, S+1)
    slot_index[user, pos] = torch.arange(num, device=items.device)
    # The extra column stands for "past the end", so that the last slot's successor reads -1 without a branch.
    return slot_index[user, pos + 1]


def nicl_loss(text: Tensor, image: Tensor, items: Tensor, tau: float = 0.1,
              next_item_positives: bool = True) -> Tensor:
    """L_NICL: symmetric multi-positive cross-modal InfoNCE with next-item positives (PMMRec, ICDE 2024).

    Several positives per anchor are combined by **summing over positives in the numerator** (our design)::

        loss(a) = -log( sum_{p in P} exp(s_ap / tau) / sum_{c in P ∪ N} exp(s_ac / tau) )

    i.e. the anchor should put its probability mass on the positive *set*, however it splits it among them.
    The alternative, the mean over positives of ``-log softmax`` of each (SupCon's "L_out"), would also push
    the three positives to be equally similar to the anchor, which is too strong here: the next item is a
    weaker signal than the same item's other view. With a single positive both forms are the same loss.

    Args:
        text: ``(B, S, D)`` the (already head-projected) text vector of every item slot.
        image: ``(B, S, D)`` the image vector of every item slot; both are l2-normalised here.
        items: ``(B, S)`` item numbers, 0 = padding. Valid anchors are the non-padding slots; "the next slot"
            is the next column of the same row, so sequences are expected left-padded in time order.
        tau: temperature (``NiclConfig.tau``, default 0.1).
        next_item_positives: False drops the next-item positives (``NiclConfig.next_item_positives``).

    Returns:
        A scalar, the mean over the ``2M`` anchors (text and image of the ``M`` valid slots). Every anchor
        has at least its own other-modality positive, so the loss is always finite; with no valid slot it is a
        zero that keeps the graph.
    """
    if text.dim() != 3 or text.shape != image.shape or tuple(items.shape) != tuple(text.shape[:2]):
        raise ValueError(f"text and image must be (B, S, D) and items (B, S); got {tuple(text.shape)}, "
                         f"{tuple(image.shape)} and {tuple(items.shape)}")
    if items.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"items must be an integer tensor, got {items.dtype}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")

    coords = (items != 0).nonzero()  # (M, 2): (user, position) of each valid slot
    num = coords.shape[0]
    if num == 0:
        return (text.sum() + image.sum()) * 0.0
    user, pos = coords[:, 0], coords[:, 1]
    slot_item = items[user, pos]  # (M,)

    nxt = _next_slot(items, user, pos)  # (M,)
    if not next_item_positives:
        nxt = torch.full_like(nxt, -1)
    has_next = nxt >= 0  # (M,)
    # Item 0 (padding) never equals a valid slot's item, so anchors without a next positive compare with
    # nothing on that side.
    next_item = torch.where(has_next, slot_item[nxt.clamp(min=0)], torch.zeros_like(slot_item))  # (M,)

    # Slot-level relations, anchor slot i (rows) x candidate slot j (columns); both modalities share them.
    cols = torch.arange(num, device=items.device)
    is_next = has_next[:, None] & (cols[None, :] == nxt[:, None])  # (M, M)
    same_user = user[:, None] == user[None, :]  # (M, M)
    holds_positive_item = ((slot_item[None, :] == slot_item[:, None])
                           | (slot_item[None, :] == next_item[:, None]))  # (M, M)
    negative = ~same_user & ~holds_positive_item  # (M, M)

    # Rows and columns of the (2M, 2M) problem are [text of the M slots; image of the M slots].
    same_slot = torch.eye(num, dtype=torch.bool, device=items.device)  # (M, M)
    other_modality = torch.zeros_like(same_slot)
    cross = torch.cat([torch.cat([other_modality, same_slot], 1),
                       torch.cat([same_slot, other_modality], 1)], 0)  # (2M, 2M)
    positive = cross | is_next.repeat(2, 2)  # (2M, 2M): the same item's other view, the next item's two views
    candidate = positive | negative.repeat(2, 2)  # (2M, 2M); positives and negatives are disjoint (same user)

    vectors = F.normalize(torch.cat([text[user, pos], image[user, pos]], dim=0), dim=-1)  # (2M, D)
    logits = vectors @ vectors.t() / tau  # (2M, 2M)
    # The dtype's most negative finite value rather than -inf: every row keeps at least one positive, so each
    # logsumexp has a finite maximum, masked terms contribute exactly exp(min - max) = 0, and no NaN arises.
    floor = torch.finfo(logits.dtype).min
    log_positive = logits.masked_fill(~positive, floor).logsumexp(dim=1)  # (2M,)
    log_all = logits.masked_fill(~candidate, floor).logsumexp(dim=1)  # (2M,)
    return (log_all - log_positive).mean()


def anchor_rows(items: Tensor, max_slots: int | None, generator: torch.Generator | None = None) -> Tensor | None:
    """The rows (sequences) of ``items`` (B, S) whose valid slots NICL uses: None (all of them) when they hold at
    most ``max_slots`` valid slots; otherwise a random subset, in a random order drawn with ``generator``, of as
    many whole rows as fit within ``max_slots`` (at least one row, whatever its length)."""
    counts = (items != 0).sum(dim=1)  # (B,)
    if max_slots is None or int(counts.sum()) <= max_slots:
        return None
    order = torch.randperm(len(counts), generator=generator).to(items.device)  # (B,)
    fits = counts[order].cumsum(0) <= max_slots
    fits[0] = True
    return order[fits]


def nicl_term(out, batch) -> Tensor:
    """L_NICL on the pooled, projected text and image tokens of the batch's items; with more valid slots than
    ``objectives.nicl.max_slots``, on those of a random subset of the sequences (seeded per step)."""
    cfg = out.config.nicl
    text = out.model.heads["nicl_text"](out.tokens.pooled_text())[batch.inverse]  # (B, L+1, D)
    image = out.model.heads["nicl_image"](out.tokens.pooled_image())[batch.inverse]
    items = batch.items
    rows = anchor_rows(items, cfg.max_slots, torch.Generator().manual_seed(out.noise_seed + 1))
    if rows is not None:
        text, image, items = text[rows], image[rows], items[rows]
    return nicl_loss(text.float(), image.float(), items, cfg.tau, cfg.next_item_positives)


def nicl_heads(config, item_encoder) -> dict:
    if not (item_encoder.uses_text and item_encoder.uses_vision):
        raise ConfigError("objectives.use includes nicl, which aligns text and image: it needs "
                          "model.modality=multimodal and model.item_tower=content")
    cfg = config.objectives.nicl
    return {"nicl_text": ContrastiveHead.from_config(config.model.dim, cfg),
            "nicl_image": ContrastiveHead.from_config(config.model.dim, cfg)}


OBJECTIVE = Objective("nicl", nicl_term, nicl_heads, section="nicl")
