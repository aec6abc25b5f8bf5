"""Top-K ranking metrics from the rank of each user's held-out item (docs/design.md §7).

PMMRec (ICDE 2024) reports HR@K and NDCG@K under leave-one-out full ranking; we add MRR@K. With one relevant item
per user at 0-based rank ``r`` (``r < 0`` = never retrieved), the per-user values are

* ``HR@k   = 1``              if ``0 <= r < k``, else 0;
* ``NDCG@k = 1 / log2(r + 2)`` if ``0 <= r < k``, else 0 (the ideal DCG of a single relevant item is 1);
* ``MRR@k  = 1 / (r + 1)``     if ``0 <= r < k``, else 0.

:func:`metric_sums` returns sums and a count so that shards (DDP ranks, evaluation chunks) can be added up and
divided once, which is exact; :func:`mean_metrics` does the division.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["COUNT_KEY", "METRIC_NAMES", "mean_metrics", "metric_sums", "metrics_from_ranks", "per_user_metrics"]

METRIC_NAMES = ("HR", "NDCG", "MRR")
COUNT_KEY = "count"


def _as_ranks(ranks: Tensor | Sequence[int | None]) -> Tensor:
    if not isinstance(ranks, Tensor):
        ranks = torch.tensor([-1 if r is None else int(r) for r in ranks], dtype=torch.long)
    if ranks.dim() != 1:
        raise ValueError(f"ranks must be 1-D (one rank per user), got shape {tuple(ranks.shape)}")
    if ranks.is_floating_point() or ranks.is_complex():
        raise ValueError(f"ranks must be integers, got {ranks.dtype}")
    return ranks.long()


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, got {ks}")
    return ks


def per_user_metrics(ranks: Tensor | Sequence[int | None], k: int) -> dict[str, Tensor]:
    """Per-user ``HR@k``, ``NDCG@k`` and ``MRR@k`` as float64 tensors of shape ``(U,)``."""
    k = _check_ks([k])[0]
    ranks = _as_ranks(ranks)
    hit = (ranks >= 0) & (ranks < k)  # (U,)
    position = ranks.clamp(min=0).double()  # (U,); misses are zeroed by `hit` below
    return {
        f"HR@{k}": hit.double(),
        f"NDCG@{k}": torch.where(hit, 1.0 / torch.log2(position + 2.0), 0.0),
        f"MRR@{k}": torch.where(hit, 1.0 / (position + 1.0), 0.0),
    }


def metric_sums(ranks: Tensor | Sequence[int | None], ks: Iterable[int]) -> dict[str, float]:
    """Sums of every metric over the users, plus ``"count"`` (the number of users).

    Keys are ordered metric-major: ``HR@k`` for every k, then ``NDCG@k``, then ``MRR@k``, then ``count``.
    """
    ks = _check_ks(ks)
    ranks = _as_ranks(ranks)
    per_k = {k: per_user_metrics(ranks, k) for k in ks}
    sums = {f"{name}@{k}": float(per_k[k][f"{name}@{k}"].sum()) for name in METRIC_NAMES for k in ks}
    sums[COUNT_KEY] = float(ranks.shape[0])
    return sums


def mean_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """Divide the sums of :func:`metric_sums` (possibly added over shards) by their count.

    With no user at all every metric is 0.0, not NaN, so that logs and JSON stay valid.
    """
    count = float(sums[COUNT_KEY])
    return {key: (float(value) / count if count > 0 else 0.0) for key, value in sums.items() if key != COUNT_KEY}


def metrics_from_ranks(ranks: Tensor | Sequence[int | None], ks: Iterable[int]) -> dict[str, float]:
    """Mean ``HR@k``, ``NDCG@k`` and ``MRR@k`` over the users, for every ``k`` in ``ks``.

    ``ranks`` holds each user's 0-based rank of the target; ``-1`` (or None in a list) means not retrieved.
    """
    return mean_metrics(metric_sums(ranks, ks))
