"""Sequence corruption for L_NID and L_RCL (PMMRec, Li et al., ICDE 2024; docs/design.md §5).

The paper's abstract names a noised item detection objective and a robustness-aware contrastive objective but
its body (how the noise is made) is not available to us, so this module is **our design**: a training sequence
is corrupted once per step, the user encoder reads the corrupted copy, NID learns which positions changed and
RCL pulls the clean and corrupted user representations together. Two kinds of noise are offered:

* *replace* (default): every non-padded position is, independently with probability ``ratio``, overwritten by
  an item drawn uniformly from the non-padded slots of the whole batch (so popular in-batch items are drawn
  more often, as they occupy more slots);
* *shuffle* (``NidConfig.shuffle``): per user, one random contiguous run of the real positions, of length
  about ``ratio * n`` (at least 2), is randomly permuted; the items of the sequence stay the same multiset.

In both modes ``changed`` is 1 only where the item actually differs from the clean one: a replacement that
draws the same item, or a permutation that leaves an item in place (or swaps two equal items), is not noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["corrupt"]


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    # A generator can only feed draws on its own device; draw there, then move, so that a CPU generator can
    # drive corruption of a CUDA batch (and results do not depend on where the batch lives).
    draw_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=draw_device).to(device)


def _replace(items: Tensor, valid: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    pool = items[valid]  # (P,) item of every non-padded slot of the batch, with multiplicity
    chosen = (_uniform(tuple(items.shape), generator, items.device) < ratio) & valid  # (B, S)
    # floor(u * P) is uniform over 0..P-1; the clamp guards the (measure-zero) rounding of u * P up to P.
    picks = (_uniform(tuple(items.shape), generator, items.device) * pool.numel()).long()  # (B, S)
    picks = picks.clamp_(max=pool.numel() - 1)
    return torch.where(chosen, pool[picks], items)


def _shuffle(items: Tensor, valid: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    n = valid.sum(dim=1)  # (B,) real positions per user
    rank = valid.long().cumsum(dim=1) - 1  # (B, S) index of each real position among the user's real ones
    # Span length ~ ratio * n, at least 2 (a single item cannot be permuted), at most n; 0 when n < 2.
    length = (ratio * n.double()).round().long().clamp(min=2)
    length = torch.where(n >= 2, torch.minimum(length, n), torch.zeros_like(n))  # (B,)
    start = (_uniform((items.shape[0],), generator, items.device) * (n - length + 1)).long()  # (B,)
    start = torch.minimum(start, (n - length).clamp(min=0))
    in_span = valid & (rank >= start[:, None]) & (rank < (start + length)[:, None])  # (B, S)

    # Vectorised per-row permutation of the span only. With stable sorts, `src` lists the span's positions in
    # a random order and `dst` in ascending order, each followed by every other position in ascending order;
    # so the first `length` entries move span items among span positions, and the rest map a position to
    # itself.
    keys = _uniform(tuple(items.shape), generator, items.device)  # (B, S), in [0, 1)
    src = torch.where(in_span, keys, torch.ones_like(keys)).argsort(dim=1, stable=True)  # (B, S)
    dst = (~in_span).to(torch.uint8).argsort(dim=1, stable=True)  # (B, S)
    out = torch.empty_like(items)
    out.scatter_(1, dst, items.gather(1, src))
    return out


def corrupt(items: Tensor, ratio: float, generator: torch.Generator | None = None,
            shuffle: bool = False) -> tuple[Tensor, Tensor]:
    """Corrupt item sequences for L_NID / L_RCL (our design, docs/design.md §5; PMMRec, ICDE 2024).

    Args:
        items: ``(B, S)`` integer item numbers, 0 = padding (left-padded, though any padding pattern works).
        ratio: noise level in ``[0, 1]``. Replace mode: the probability that a non-padded position is replaced
            by an item drawn uniformly from the batch's non-padded slots. Shuffle mode: the length of the
            permuted span as a fraction of the user's real positions (rounded, at least 2, at most all of
            them). ``ratio == 0`` disables corruption in both modes.
        generator: source of every random draw (the global RNG is never touched when one is given); the same
            generator state and input always give the same output.
        shuffle: permute one random contiguous span of real positions per user instead of replacing items.

    Returns:
        ``(corrupted, changed)``: the ``(B, S)`` corrupted items (same dtype and device as ``items``; padding
        is never changed) and a ``(B, S)`` bool mask, True exactly where ``corrupted != items``.
    """
    if items.dim() != 2:
        raise ValueError(f"items must be (B, S), got shape {tuple(items.shape)}")
    if items.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"items must be an integer tensor, got {items.dtype}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")

    valid = items != 0  # (B, S)
    if ratio == 0.0 or not bool(valid.any()):
        return items.clone(), torch.zeros_like(valid)
    corrupted = (_shuffle if shuffle else _replace)(items, valid, ratio, generator)
    return corrupted, corrupted != items
