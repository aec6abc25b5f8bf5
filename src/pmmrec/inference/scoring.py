"""Exact top-K over a large catalogue with a certified bfloat16 first pass (CPUs with fast bfloat16 dot products).

Scoring every catalogue item in float32 is most of what a recommendation costs on a CPU. Where the CPU has native
bfloat16 dot products (AVX512-BF16, AMX) a bfloat16 matrix product is 2-4x faster, but its scores are rounded:
ranking by them alone would change which items are returned. So the bfloat16 pass only *shortlists*:

1. approximate scores ``a = bf16(u) . bf16(v)`` for every item not excluded, and each user's ``m = k + MARGIN``
   best by them;
2. exact float32 scores for those ``m`` candidates only; excluded items dropped; the best ``k`` kept;
3. a **certificate** per user: rounding ``u`` and ``v`` to bfloat16 (8 significant bits) and the product to
   bfloat16 moves a score by at most ``3 * 2**-8 * sum_i |u_i v_i| <= 3 * 2**-8 * |u| max_j |v_j|``; we use the
   bound ``err = 2**-6 * |u| * max_j |v_j|`` (a third more). An item left out has ``a_j <= a_m``, so its exact
   score is at most ``a_m + err``. If the k-th exact score found is above that, no item left out can beat it and
   the answer is exactly the float32 top-k. A user whose certificate fails (near-ties at the cut, NaN, too few
   candidates) is answered by the plain float32 path (:func:`pmmrec.evaluation.ranking.topk_items`).

The answer is therefore the same as the float32 path's, except for the order of items whose exact scores are
equal to float32 rounding (candidates are rescored one dot product at a time, so a score can differ from the
matrix product's in the last bit). The bound assumes the products are accumulated in float32, as torch's CPU
kernels (oneDNN's and its own) do. Whether bfloat16 is faster is measured once per process (:func:`bf16_pays`).

When it pays: the bound is a worst case (``|u| |v|``), which grows with the vector dimension against the gaps
between the best scores. Measured on random vectors, 100,000 items, 2,000 users, k = 20: at dimension 64 the
certificate held for 99% of the users and the top-K took 0.39 s against 0.70 s in float32; at dimension 256 it
failed for 80% and took 2.05 s against 1.30 s. :attr:`ShortlistScorer.pays` turns false in such a case and the
:class:`~pmmrec.inference.Recommender` then scores in float32.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import Tensor

from pmmrec.evaluation.ranking import ItemBlocks, history_in_chunk, pad_histories, topk_items

MARGIN = 32  # shortlist slots beyond k: enough for the certificate to hold for (nearly) every user
ERROR_FACTOR = 2.0**-6  # err = ERROR_FACTOR * |u| * max |v|: above the 3 * 2**-8 bound of bfloat16 rounding
# Items per bfloat16 product in the shortlist: a (24, 32768) float32 block is 3 MiB. Measured on 2 idle cores
# (24 users, k 10, dim 64, 20 calls x 9 interleaved rounds), median ms a call at 100,000 / 300,000 items:
# 65536 13.9 / 31.5, 49152 13.5 / 26.6, 32768 11.8 / 27.4, 24576 11.0 / 27.5, 16384 12.3 / 30.3.
ITEM_CHUNK = 32768
USER_CHUNK = 64
GROUP = 64  # columns per group in block_topk


@functools.cache
def bf16_pays(dim: int = 64, items: int = 32768, users: int = 24) -> bool:
    """Whether a bfloat16 matrix product is at least 1.5x faster than a float32 one here (measured once)."""
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(users, dim, generator=gen), torch.randn(items, dim, generator=gen)
    ub, vb = u.bfloat16(), v.bfloat16()

    def best(fn, a, b) -> float:
        fn(a, b)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fn(a, b)
            times.append(time.perf_counter() - started)
        return min(times)

    mm = lambda a, b: a @ b.t()  # noqa: E731
    return best(mm, ub, vb) * 1.5 <= best(mm, u, v)


class ShortlistScorer:
    """Exact top-K of users over one set of item vectors, shortlisted in bfloat16 (see the module docstring)."""

    def __init__(self, vectors: Tensor | ItemBlocks):
        """``vectors``: ``(N+1, D)`` with row 0 the padding, or the catalogue's :class:`ItemBlocks` (read in
        place, float32). The bfloat16 copy is this scorer's own: half the size of the float32 vectors."""
        if isinstance(vectors, Tensor) and (vectors.dim() != 2 or vectors.shape[0] < 2):
            raise ValueError(f"vectors must be (N+1, D) with row 0 the padding, got {tuple(vectors.shape)}")
        self.items = ItemBlocks.of(vectors.float() if isinstance(vectors, Tensor) else vectors)
        if self.items.count < 1:
            raise ValueError("vectors must hold at least one item")
        low = [b.bfloat16() for b in self.items.blocks]
        self.low = low[0] if len(low) == 1 else torch.cat(low)  # (N, D): item i is row i - 1
        self.max_norm = max(float(b.float().norm(dim=1).max()) for b in self.items.blocks)
        self.users = 0  # users answered
        self.fallbacks = 0  # of them, answered by the float32 path (the certificate failed)

    @property
    def pays(self) -> bool:
        """False once at least 256 users were answered and over a fifth of them needed the float32 path: the
        rounding bound is then too wide for these vectors (it grows with the dimension against the gaps
        between the best scores), and the shortlist costs more than it saves."""
        return self.users < 256 or self.fallbacks * 5 <= self.users

    def topk(self, users: Tensor, k: int, exclude=None, *, user_chunk: int = USER_CHUNK) -> tuple[Tensor, Tensor]:
        """``(scores, items)``, both ``(U, k)``, as :func:`~pmmrec.evaluation.ranking.topk_items` returns them;
        ``user_chunk`` users at a time (memory is ``O(user_chunk * ITEM_CHUNK)``)."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        num_users = users.shape[0]
        excl = None if exclude is None else pad_histories(exclude, num_users, users.device)
        if num_users <= user_chunk:
            return self._topk(users, k, excl)
        parts = [self._topk(users[u0:u0 + user_chunk], k, None if excl is None else excl[u0:u0 + user_chunk])
                 for u0 in range(0, num_users, user_chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _topk(self, users: Tensor, k: int, excl: Tensor | None) -> tuple[Tensor, Tensor]:
        num_users, num_items = users.shape[0], self.low.shape[0]
        self.users += num_users
        if num_users == 0:
            return topk_items(users, self.items, k, excl)
        m = k + MARGIN
        if m >= num_items:  # a small catalogue: the shortlist would be all of it
            return topk_items(users, self.items, k, excl)
        users = users.float()
        approx, cand = self._shortlist(users, m, excl)  # (U, m) best approximate scores, item numbers
        exact = torch.bmm(self.items.gather(cand), users.unsqueeze(2)).squeeze(2)  # (U, m) float32
        if excl is not None:
            excluded = (cand.unsqueeze(2) == excl.unsqueeze(1)).any(2)  # (U, m)
            exact = exact.masked_fill(excluded, float("-inf"))
        scores, pick = exact.topk(k, dim=1)  # (U, k)
        items = cand.gather(1, pick)
        err = ERROR_FACTOR * users.norm(dim=1) * self.max_norm  # (U,)
        certified = scores[:, -1] > approx[:, -1] + err  # NaN and -inf (too few left) fail
        if not bool(certified.all()):
            redo = (~certified).nonzero().squeeze(1)
            self.fallbacks += len(redo)
            sub = None if excl is None else excl[redo]
            scores[redo], items[redo] = topk_items(users[redo], self.items, k, sub)
        return scores, items

    def _shortlist(self, users: Tensor, m: int, excl: Tensor | None) -> tuple[Tensor, Tensor]:
        """Each user's ``m`` best items by bfloat16 scores, excluded items left out (``-inf``):
        ``(approx float32, item numbers)``, both ``(U, m)``."""
        low_users = users.bfloat16()
        rows = None if excl is None else torch.arange(len(users), device=users.device).unsqueeze(1).expand_as(excl)
        best_scores = best_items = None
        for i0 in range(0, self.low.shape[0], ITEM_CHUNK):
            # float32 from here: a max or top-K over bfloat16 is several times slower on a CPU than the product
            block = (low_users @ self.low[i0:i0 + ITEM_CHUNK].t()).float()  # (U, Ic) approximate scores
            if excl is not None:  # item numbers i0+1 .. i0+Ic are this block's columns 0 .. Ic-1
                inside, cols = history_in_chunk(excl, i0 + 1, i0 + 1 + block.shape[1])
                block[rows[inside], cols[inside]] = float("-inf")
            scores, idx = block_topk(block, min(m, block.shape[1]))
            idx = idx + (i0 + 1)  # item numbers (row 0 of the catalogue is padding)
            if best_scores is not None:
                scores, idx = torch.cat([best_scores, scores], 1), torch.cat([best_items, idx], 1)
                scores, pick = scores.topk(min(m, scores.shape[1]), dim=1)
                idx = idx.gather(1, pick)
            best_scores, best_items = scores, idx
        return best_scores, best_items


def block_topk(x: Tensor, m: int, group: int = GROUP) -> tuple[Tensor, Tensor]:
    """``x.topk(m, dim=1)`` for a wide ``(U, W)`` ``x``, by way of the maxima of groups of ``group`` columns.

    The ``m`` largest values of a row lie in at most ``m`` groups, and those groups' maxima are among the ``m``
    largest group maxima; so the top ``m`` of the elements of the best ``m`` groups are the row's top ``m`` (up to
    which of equal values is picked). A max over groups plus two small top-Ks replace one wide top-K, which on a
    CPU is several times slower than the max. Returns ``(values, column indices)``, values in descending order.
    """
    rows, width = x.shape
    groups = width // group
    if groups <= m:  # too narrow to gain anything
        return x.topk(m, dim=1)
    body = groups * group
    maxima = x[:, :body].reshape(rows, groups, group).amax(2)  # (U, G)
    best = maxima.topk(m, dim=1).indices  # (U, m) groups
    cols = (best.unsqueeze(2) * group + torch.arange(group, device=x.device)).reshape(rows, m * group)
    if body < width:  # the last, partial group: always a candidate
        tail = torch.arange(body, width, device=x.device).expand(rows, width - body)
        cols = torch.cat([cols, tail], dim=1)
    values, pick = x.gather(1, cols).topk(m, dim=1)
    return values, cols.gather(1, pick)
