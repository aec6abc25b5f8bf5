"""L_rec, the next-item prediction loss of PMMRec (Li et al., "Multi-Modality is All You Need for Transferable
Recommender Systems", ICDE 2024; docs/design.md §5).

The paper trains the user encoder to predict, at every position of a user's sequence, the next item against all
item slots of the batch (in-batch softmax) with a logQ popularity correction. :func:`next_item_loss` follows the
reference code's loss exactly, vectorised over the batch (the reference loops over users in Python):

* a user ``u`` contributes one left-padded window of ``L + 1`` item slots; the user encoder reads slots
  ``0..L-1`` and position ``j`` predicts slot ``j + 1``;
* the candidates are all ``B * (L + 1)`` slots of the batch, or, in data-parallel training with
  ``train.gather_negatives``, the slots of every rank's share of the global batch (``cand_*`` arguments), which
  makes N processes with B users each train exactly the objective of one process with N * B users;
* ``logit[u, j, c] = h_{u,j} . e_c - log p(item_c)`` (``p`` = training popularity; padding has ``p = 1``);
* masked out: padding slots, and every slot whose item occurs anywhere in ``u``'s window, except the true
  target slot ``(u, j + 1)``; other slots that hold the target's item stay masked, as in the reference;
* cross-entropy, averaged over non-padded input positions.

:func:`sampled_next_item_loss` is the cheaper variant for very large batches: ``K`` sampled negatives shared by
the whole batch instead of every slot of the batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pmmrec.objectives.base import Objective
from pmmrec.objectives.catalogue import catalogue_next_item_loss
from pmmrec.runtime import distributed

__all__ = ["log_popularity", "next_item_loss", "sample_negative_items", "sampled_next_item_loss",
           "window_item_mask"]


def log_popularity(train_counts: np.ndarray | Tensor, zero_count: float = 1.0) -> Tensor:
    """``log p(item)`` for the logQ correction of L_rec, as a float32 tensor of shape ``(N + 1,)``.

    ``train_counts[k]`` is how often item ``k`` occurs in the training sequences (index 0, padding, is ignored).
    As in the reference code, ``p = counts / counts[1:].sum()`` and the padding entry gets ``p = 1`` (log 0), so
    padding slots are not shifted. An item that never occurs in training would get ``log 0 = -inf`` and thus an
    infinite logit; it is given the pseudo-count ``zero_count`` instead (default 1: as rare as the rarest
    item that was seen), while the normaliser stays the sum of the real counts so that every seen item's
    probability is exactly the reference's.
    """
    if isinstance(train_counts, Tensor):
        counts = train_counts.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    else:
        counts = torch.from_numpy(np.asarray(train_counts, dtype=np.float64).reshape(-1))
    if counts.numel() < 2:
        raise ValueError(f"train_counts needs an entry for padding and at least one item, got {counts.numel()}")
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError("train_counts must be finite and non-negative")
    if zero_count <= 0:
        raise ValueError(f"zero_count must be positive, got {zero_count}")
    total = counts[1:].sum()
    if total <= 0:
        raise ValueError("train_counts has no occurrence of any item (all counts are 0)")
    probs = torch.where(counts > 0, counts, torch.full_like(counts, zero_count)) / total
    probs[0] = 1.0
    return probs.log().to(torch.float32)


def window_item_mask(items: Tensor, cand_items: Tensor) -> Tensor:
    """``(B, C)`` bool: candidate ``c`` is padding, or its item occurs somewhere in user ``b``'s window.

    ``items`` is ``(B, S)`` item numbers (0 = padding), ``cand_items`` is ``(C,)``. A per-row binary search
    keeps the memory at ``O(B * C)``; comparing every slot with every candidate would need ``O(B * S * C)``.
    """
    batch, slots = items.shape
    sorted_items = items.sort(dim=1).values  # (B, S)
    queries = cand_items.to(items.dtype).unsqueeze(0).expand(batch, -1).contiguous()  # (B, C)
    pos = torch.searchsorted(sorted_items, queries).clamp_(max=slots - 1)  # (B, C)
    found = sorted_items.gather(1, pos) == queries  # (B, C)
    return found | (queries == 0)


def _masked_logits(logits: Tensor, mask: Tensor) -> Tensor:
    # The dtype's most negative finite value rather than -inf: every row keeps its (never masked) target, so
    # the softmax maximum is finite and exp(min - max) is exactly 0, and no inf - inf can make a NaN. The
    # reference's -1e4 is exact only while real logits stay far above -1e4.
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def _empty_loss(*tensors: Tensor) -> Tensor:
    # No non-padded position at all: a zero that still depends on the inputs, so that backward() and DDP's
    # gradient hooks see every parameter (a plain mean over nothing would be NaN).
    return sum(t.sum() for t in tensors) * 0.0


def _check_window(user_states: Tensor, item_embs: Tensor, items: Tensor) -> tuple[int, int, int]:
    if user_states.dim() != 3:
        raise ValueError(f"user_states must be (B, L, D), got shape {tuple(user_states.shape)}")
    batch, length, dim = user_states.shape
    if tuple(item_embs.shape) != (batch, length + 1, dim):
        raise ValueError(f"item_embs must be (B, L+1, D) = {(batch, length + 1, dim)}, got {tuple(item_embs.shape)}")
    if tuple(items.shape) != (batch, length + 1):
        raise ValueError(f"items must be (B, L+1) = {(batch, length + 1)}, got {tuple(items.shape)}")
    if items.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"items must be an integer tensor, got {items.dtype}")
    return batch, length, dim


def next_item_loss(user_states: Tensor, item_embs: Tensor, items: Tensor, log_pop: Tensor | None = None, *,
                   cand_embs: Tensor | None = None, cand_items: Tensor | None = None,
                   cand_offset: int = 0, reduction: str = "mean") -> Tensor:
    """L_rec: in-batch softmax next-item cross-entropy with logQ correction (PMMRec, ICDE 2024; ref code).

    Args:
        user_states: ``(B, L, D)`` user encoder output for input slots ``0..L-1`` of each window.
        item_embs: ``(B, L+1, D)`` item vectors of each user's window (left-padded; the last slot is real).
        items: ``(B, L+1)`` item numbers of those slots, 0 = padding.
        log_pop: ``(N+1,)`` ``log p(item)`` from :func:`log_popularity`; None = no logQ correction.
        cand_embs: ``(C, D)`` candidate vectors gathered across ranks; None = this batch's slots.
        cand_items: ``(C,)`` their item numbers (required with ``cand_embs``).
        cand_offset: where this batch's ``B * (L+1)`` slots, flattened row-major, sit in the gathered set;
            the caller guarantees ``cand_items[cand_offset:cand_offset + B*(L+1)] == items.flatten()``.
        reduction: ``"mean"`` over the positions, or ``"sum"`` (data-parallel training divides the sum by the
            number of positions on all ranks together, so that the loss is the mean over the global batch).

    Returns:
        A scalar: the mean (or sum) of the cross-entropy over non-padded input positions (``items[:, :-1] != 0``).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    batch, length, dim = _check_window(user_states, item_embs, items)
    slots = length + 1
    if cand_embs is None:
        if cand_items is not None:
            raise ValueError("cand_items given without cand_embs")
        cand_embs = item_embs.reshape(batch * slots, dim)  # (C, D), C = B * (L+1)
        cand_items = items.reshape(-1)  # (C,)
        cand_offset = 0
    else:
        if cand_items is None:
            raise ValueError("cand_embs given without cand_items")
        if cand_embs.dim() != 2 or cand_embs.shape[1] != dim or tuple(cand_items.shape) != (cand_embs.shape[0],):
            raise ValueError(f"cand_embs must be (C, {dim}) and cand_items (C,), got {tuple(cand_embs.shape)} and "
                             f"{tuple(cand_items.shape)}")
        if not 0 <= cand_offset <= cand_embs.shape[0] - batch * slots:
            raise ValueError(f"cand_offset {cand_offset} leaves no room for the batch's {batch * slots} slots "
                             f"among {cand_embs.shape[0]} candidates")

    valid = items[:, :-1] != 0  # (B, L) non-padded input positions
    rows = valid.nonzero()  # (V, 2): (user, position) of each prediction
    if rows.shape[0] == 0:
        return _empty_loss(user_states, item_embs, cand_embs)
    row_user, row_pos = rows[:, 0], rows[:, 1]
    targets = cand_offset + row_user * slots + row_pos + 1  # (V,) column of the true next slot

    # Only the V predictions that count are scored: padded positions would be dropped anyway.
    logits = user_states[row_user, row_pos] @ cand_embs.t()  # (V, C)
    if log_pop is not None:
        logits = logits - log_pop.to(device=logits.device, dtype=logits.dtype)[cand_items]

    mask = window_item_mask(items, cand_items)[row_user]  # (V, C); indexing copies, so writing is safe
    mask[torch.arange(targets.shape[0], device=mask.device), targets] = False
    return F.cross_entropy(_masked_logits(logits, mask), targets, reduction=reduction)


def sampled_next_item_loss(user_states: Tensor, item_embs: Tensor, items: Tensor, neg_embs: Tensor,
                           neg_items: Tensor, log_q: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """L_rec with ``K`` sampled negatives shared by the batch, for batches too large for the in-batch softmax.

    The positive of position ``j`` is slot ``j + 1``; the candidates are the positive and the ``K`` negatives
    ``neg_embs`` ``(K, D)`` with item numbers ``neg_items`` ``(K,)``. As in :func:`next_item_loss`, a negative
    whose item occurs in the user's window (the target included) or that is padding is masked out.
    ``log_q`` ``(N+1,)`` is the log of the distribution the negatives were drawn from (e.g.
    :func:`log_popularity` for popularity sampling) and is subtracted from every logit; None (uniform
    sampling, where the correction is a constant) leaves the logits unchanged. ``reduction``: ``"mean"`` over
    the non-padded positions or ``"sum"``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    batch, length, dim = _check_window(user_states, item_embs, items)
    if neg_embs.dim() != 2 or neg_embs.shape[1] != dim or tuple(neg_items.shape) != (neg_embs.shape[0],):
        raise ValueError(f"neg_embs must be (K, {dim}) and neg_items (K,), got {tuple(neg_embs.shape)} and "
                         f"{tuple(neg_items.shape)}")
    valid = items[:, :-1] != 0  # (B, L)
    rows = valid.nonzero()  # (V, 2)
    if rows.shape[0] == 0:
        return _empty_loss(user_states, item_embs, neg_embs)
    row_user, row_pos = rows[:, 0], rows[:, 1]
    queries = user_states[row_user, row_pos]  # (V, D)
    positives = item_embs[row_user, row_pos + 1]  # (V, D)
    pos_logits = (queries * positives).sum(-1, keepdim=True)  # (V, 1)
    neg_logits = queries @ neg_embs.t()  # (V, K)
    if log_q is not None:
        log_q = log_q.to(device=queries.device, dtype=queries.dtype)
        pos_logits = pos_logits - log_q[items[row_user, row_pos + 1]].unsqueeze(1)
        neg_logits = neg_logits - log_q[neg_items]
    neg_logits = _masked_logits(neg_logits, window_item_mask(items, neg_items)[row_user])
    logits = torch.cat([pos_logits, neg_logits], dim=1)  # (V, 1 + K), the positive in column 0
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device),
                           reduction=reduction)


def sample_negative_items(k: int, num_items: int, log_pop: Tensor | None = None,
                          generator: torch.Generator | None = None) -> Tensor:
    """``k`` item numbers in ``1..num_items``, uniformly (``log_pop`` None) or by popularity ``exp(log_pop)``.

    Drawn with replacement; pass the same ``log_pop`` (or None) as ``log_q`` to :func:`sampled_next_item_loss`.
    """
    if k < 1 or num_items < 1:
        raise ValueError(f"need k >= 1 and num_items >= 1, got k={k}, num_items={num_items}")
    if log_pop is None:
        return torch.randint(1, num_items + 1, (k,), generator=generator)
    if log_pop.shape != (num_items + 1,):
        raise ValueError(f"log_pop must be ({num_items + 1},), got {tuple(log_pop.shape)}")
    weights = log_pop[1:].detach().to(device="cpu", dtype=torch.float64).exp()  # (N,)
    return torch.multinomial(weights, k, replacement=True, generator=generator) + 1


def rec_term(out, batch) -> Tensor:
    """L_rec of the step with the candidates of ``objectives.rec.negatives``; under torchrun, this rank's share of
    the mean over the global batch's positions (the same loss at any number of processes)."""
    states, item_embs, items = out.states.float(), out.item_embs.float(), batch.items
    negatives = out.config.rec.negatives
    world = distributed.world_size()
    if negatives == "in_batch" and world == 1:
        return next_item_loss(states, item_embs, items, out.log_pop)
    if negatives == "in_batch":
        gathered = {}
        if out.gather_negatives:
            # Every rank's slots, in rank order (= the global batch's order); the gradient that this rank's
            # positions send to other ranks' item vectors flows back to them through the gather.
            embs = distributed.all_gather_varlen(item_embs.reshape(-1, item_embs.shape[-1]), grad=True)
            slots = distributed.all_gather_varlen(items.reshape(-1))
            gathered = {"cand_embs": torch.cat(embs), "cand_items": torch.cat(slots),
                        "cand_offset": sum(len(s) for s in slots[:distributed.rank()])}
        total = next_item_loss(states, item_embs, items, out.log_pop, reduction="sum", **gathered)
    elif negatives == "catalogue":
        total = catalogue_next_item_loss(states, items, out.item_vectors(None).float(), reduction="sum")
    else:  # sampled: the same negatives on every rank (drawn from the rank-free step seed)
        cfg = out.config.rec
        generator = torch.Generator().manual_seed(out.step_seed)
        negs = sample_negative_items(cfg.num_negatives, out.num_items, out.sample_log_q, generator)
        total = sampled_next_item_loss(states, item_embs, items, out.item_vectors(negs).float(),
                                       negs.to(items.device), out.sample_log_q, reduction="sum")
    positions = (items[:, :-1] != 0).sum()
    if world > 1:
        positions = distributed.all_reduce_sum(positions)
    # DDP averages gradients over the N ranks, so N * (this rank's sum) / (all positions) makes that average
    # the gradient of the mean over every position of the global batch, which one process computes.
    return total * world / positions.clamp(min=1)


OBJECTIVE = Objective("rec", rec_term, section="rec")
