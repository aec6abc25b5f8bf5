"""L_rec over the whole catalogue: a softmax over every item of the domain (``objectives.rec.negatives:
catalogue``, docs/design.md §5).

In-batch negatives (the reference code's L_rec) are a few hundred items, most of them popular; a softmax over the
whole catalogue is what makes next-item models strong on real logs (SASRec with full cross-entropy). The logit of
candidate ``c`` at position ``(u, j)`` is ``h_{u,j} . e_c``, with no popularity correction (nothing is sampled);
every item of user ``u``'s window other than the true target is masked out, as in the in-batch loss (they are
likely false negatives), and so is padding.

Memory: the ``(positions x catalogue)`` logits are computed in blocks of at most ``max_block`` entries; with more
than one block, each is recomputed in the backward pass (activation checkpointing) instead of being kept, so
peak memory stays at one block whatever the batch and catalogue sizes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = ["catalogue_next_item_loss"]

MAX_BLOCK = 2**28  # float32 logits per block: 1 GiB


def _block_loss(queries: Tensor, cand_embs: Tensor, windows: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy of ``queries`` (v, D) against every candidate (N+1, D), row 0 = padding."""
    target_logit = (queries * cand_embs[targets]).sum(-1)  # (v,)
    logits = queries @ cand_embs.t()  # (v, N+1)
    # In place (the matrix product keeps no output for backward): the window's items (the target among them) and
    # padding leave the softmax; the target then joins the normaliser once.
    lowest = torch.finfo(logits.dtype).min
    logits.scatter_(1, torch.cat([windows, windows.new_zeros(len(windows), 1)], dim=1), lowest)
    lse = torch.logaddexp(torch.logsumexp(logits, dim=1), target_logit)  # (v,)
    return (lse - target_logit).sum()


def catalogue_next_item_loss(user_states: Tensor, items: Tensor, cand_embs: Tensor, reduction: str = "mean",
                             max_block: int = MAX_BLOCK) -> Tensor:
    """Next-item cross-entropy against the whole catalogue.

    Args:
        user_states: ``(B, L, D)`` user encoder output for input slots ``0..L-1`` of each window.
        items: ``(B, L+1)`` item numbers of the windows (0 = padding); position ``j`` predicts ``items[:, j+1]``.
        cand_embs: ``(N+1, D)`` vectors of every item, row ``k`` = item ``k`` (row 0, padding, is never a
            candidate).
        reduction: ``"mean"`` over the non-padded input positions, or ``"sum"``.
        max_block: the most logits computed at once (see the module docstring).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if user_states.dim() != 3 or items.shape != (user_states.shape[0], user_states.shape[1] + 1):
        raise ValueError(f"user_states (B, L, D) and items (B, L+1) do not match: {tuple(user_states.shape)}, "
                         f"{tuple(items.shape)}")
    if cand_embs.dim() != 2 or cand_embs.shape[1] != user_states.shape[2]:
        raise ValueError(f"cand_embs must be (N+1, {user_states.shape[2]}), got {tuple(cand_embs.shape)}")
    rows = (items[:, :-1] != 0).nonzero()  # (V, 2): (user, position) of each prediction
    if rows.shape[0] == 0:
        return (user_states.sum() + cand_embs.sum()) * 0.0  # keeps every parameter in the graph (DDP)
    row_user, row_pos = rows[:, 0], rows[:, 1]
    queries = user_states[row_user, row_pos]  # (V, D)
    targets = items[row_user, row_pos + 1]  # (V,)
    windows = items[row_user]  # (V, L+1)
    step = max(1, max_block // cand_embs.shape[0])
    if step >= len(queries):
        total = _block_loss(queries, cand_embs, windows, targets)
    else:
        total = sum(checkpoint(_block_loss, queries[i:i + step], cand_embs, windows[i:i + step],
                               targets[i:i + step], use_reentrant=False) for i in range(0, len(queries), step))
    return total / len(queries) if reduction == "mean" else total
