"""Full ranking over the whole catalogue with bounded memory (docs/design.md §7).

PMMRec (ICDE 2024) evaluates leave-one-out with full ranking: every user's held-out item is ranked against all
items of the target catalogue, never against sampled negatives. Scores are dot products of user and item vectors.

Conventions (the tests pin each of them):

* **Rank** of the target = the number of competing items that score above it, 0-based. Row 0 of ``item_vecs``
  is padding and never competes, nor does the target itself.
* **Ties** (``ties``): ``"pessimistic"`` (default) counts a competitor with a score *equal* to the target's as
  ranked above it, so a model that gives every item the same score gets rank N-1, not a perfect rank 0;
  ``"optimistic"`` counts only strictly greater scores (what a stable sort that puts the target first gives).
* **Protocols**: ``exclude_history`` (paper / reference code) removes the items of the user's history from the
  competitors; ``include_history`` (RecBole-family) removes nothing.
* **Target in its own history** (an item consumed again), under ``exclude_history``: ``"keep"`` (default)
  still ranks the target, since consuming it again is a correct prediction; ``"miss"`` reproduces the reference
  code, which sets the scores of all history items to ``-inf`` before ranking, the target's included, so such a
  user counts as a miss (rank ``-1``).
* A NaN target score is a miss (rank ``-1``); NaN would otherwise lose every comparison and rank first.

Memory is ``O(user_chunk * item_chunk)`` whatever the catalogue size: for the metrics we only need to count,
chunk by chunk, the items that beat the target, which is exact and needs no top-K. :func:`topk_items` keeps a
running top-K across item chunks instead (for recommending). It also takes the items as :class:`ItemBlocks`,
consecutive blocks that are never joined: a recommender's catalogue is read-only memory maps of its vector
store's segments followed by the items added since (docs/design.md §8).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from pmmrec.evaluation.metrics import metrics_from_ranks

__all__ = ["EXCLUDE_HISTORY", "INCLUDE_HISTORY", "PROTOCOLS", "ItemBlocks", "evaluate_rankings", "full_rank",
           "pad_histories", "rank_targets", "topk_items"]

EXCLUDE_HISTORY = "exclude_history"
INCLUDE_HISTORY = "include_history"
PROTOCOLS = (EXCLUDE_HISTORY, INCLUDE_HISTORY)

Histories = Tensor | Sequence[Tensor | Sequence[int]]
Ties = Literal["pessimistic", "optimistic"]
TargetInHistory = Literal["keep", "miss"]


class ItemBlocks:
    """Item vectors ``1..N`` held as consecutive ``(n_b, D)`` blocks that are never joined; row 0, the padding, is
    implicit (zeros).

    A block may be a read-only memory map (:meth:`from_arrays`): several processes then share one copy of the
    vectors, the operating system's page cache. Nothing here writes into a block.
    """

    def __init__(self, blocks: Sequence[Tensor], dim: int | None = None):
        blocks = tuple(b for b in blocks if len(b))
        if dim is None:
            if not blocks:
                raise ValueError("ItemBlocks without blocks needs the dimension")
            dim = int(blocks[0].shape[1])
        if any(b.dim() != 2 or b.shape[1] != dim for b in blocks):
            raise ValueError(f"blocks must be (n, {dim}), got {[tuple(b.shape) for b in blocks]}")
        self.blocks, self.dim = blocks, dim
        starts, first = [], 1
        for b in blocks:
            starts.append(first)
            first += len(b)
        self.starts = starts  # item number of each block's first row
        self.count = first - 1  # N

    @classmethod
    def of(cls, vectors: Tensor | ItemBlocks) -> ItemBlocks:
        """``vectors`` as blocks: an ``(N+1, D)`` tensor (row 0 the padding) is one block, a view of rows 1..N."""
        if isinstance(vectors, ItemBlocks):
            return vectors
        if vectors.dim() != 2 or vectors.shape[0] < 1:
            raise ValueError(f"item vectors must be (N+1, D) with row 0 the padding, got {tuple(vectors.shape)}")
        return cls([vectors[1:]], int(vectors.shape[1]))

    @staticmethod
    def from_array(array: np.ndarray) -> Tensor:
        """A tensor over ``array``'s memory, without a copy, even when it is read-only (a memory map opened
        ``mode="r"``): the tensor must then never be written, which no code reading ItemBlocks does."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(array)

    @property
    def num_rows(self) -> int:
        """N + 1: the rows an ``(N+1, D)`` matrix of these items would have."""
        return self.count + 1

    def chunks(self, size: int) -> Iterator[tuple[int, Tensor]]:
        """``(first item number, (n, D) view)`` of at most ``size`` items each, in order, covering 1..N."""
        for start, block in zip(self.starts, self.blocks, strict=True):
            for i0 in range(0, len(block), size):
                yield start + i0, block[i0:i0 + size]

    def rows(self, start: int, stop: int) -> Tensor:
        """``(stop - start, D)`` vectors of items ``start..stop-1`` (1-based): a view within one block, else a copy."""
        if not 1 <= start <= stop <= self.count + 1:
            raise ValueError(f"items {start}..{stop - 1} are not within 1..{self.count}")
        parts = []
        for first, block in zip(self.starts, self.blocks, strict=True):
            lo, hi = max(start, first), min(stop, first + len(block))
            if lo < hi:
                parts.append(block[lo - first:hi - first])
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    def gather(self, numbers: Tensor) -> Tensor:
        """``numbers.shape + (D,)`` float32 vectors of item numbers ``numbers`` (0, the padding, is zeros)."""
        numbers = numbers.long().cpu()
        if len(self.blocks) == 1:
            block = self.blocks[0]
            out = block[(numbers - 1).clamp_(min=0)].float()
            out[numbers == 0] = 0.0
            return out
        out = torch.zeros(*numbers.shape, self.dim)
        for first, block in zip(self.starts, self.blocks, strict=True):
            inside = (numbers >= first) & (numbers < first + len(block))
            if bool(inside.any()):
                out[inside] = block[numbers[inside] - first].float()
        return out

    def dense(self) -> Tensor:
        """A ``(N+1, D)`` float32 copy with row 0 the padding (for inspection: requests read the blocks)."""
        out = torch.zeros(self.count + 1, self.dim)
        for first, block in zip(self.starts, self.blocks, strict=True):
            out[first:first + len(block)] = block
        return out


def pad_histories(histories: Histories, num_users: int | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """Histories as a ``(U, H)`` long tensor of item numbers, 0-padded (the order of items does not matter)."""
    if isinstance(histories, Tensor):
        padded = histories if histories.dim() == 2 else histories.reshape(len(histories), -1)
        padded = padded.long()
    else:
        rows = [torch.as_tensor(h, dtype=torch.long).reshape(-1) for h in histories]
        width = max((len(r) for r in rows), default=0)
        padded = torch.zeros(len(rows), width, dtype=torch.long)
        for row, hist in zip(padded, rows, strict=True):
            row[: len(hist)] = hist
    if num_users is not None and padded.shape[0] != num_users:
        raise ValueError(f"got {padded.shape[0]} histories for {num_users} users")
    return padded.to(device) if device is not None else padded


def _check_inputs(user_vecs: Tensor, item_vecs: Tensor, targets: Tensor | None, user_chunk: int,
                  item_chunk: int) -> None:
    if user_vecs.dim() != 2 or item_vecs.dim() != 2 or user_vecs.shape[1] != item_vecs.shape[1]:
        raise ValueError(f"user_vecs must be (U, D) and item_vecs (N+1, D), got {tuple(user_vecs.shape)} and "
                         f"{tuple(item_vecs.shape)}")
    if item_vecs.shape[0] < 2:
        raise ValueError("item_vecs needs the padding row 0 and at least one item")
    if user_chunk < 1 or item_chunk < 1:
        raise ValueError(f"chunk sizes must be positive, got user_chunk={user_chunk}, item_chunk={item_chunk}")
    if targets is not None:
        if tuple(targets.shape) != (user_vecs.shape[0],):
            raise ValueError(f"targets must be ({user_vecs.shape[0]},), got {tuple(targets.shape)}")
        if targets.numel() and (int(targets.min()) < 1 or int(targets.max()) >= item_vecs.shape[0]):
            raise ValueError(f"targets must be item numbers in 1..{item_vecs.shape[0] - 1}")


def _first_occurrences(hist: Tensor) -> Tensor:
    """``(U, H)`` bool: True at the first occurrence of each non-padding item of a row (repeats count once)."""
    if hist.shape[1] == 0:
        return hist.new_zeros(hist.shape, dtype=torch.bool)
    ordered, order = hist.sort(dim=1, stable=True)  # (U, H)
    first_sorted = torch.ones_like(ordered, dtype=torch.bool)
    first_sorted[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = torch.empty_like(first_sorted)
    first.scatter_(1, order, first_sorted)
    return first & (hist != 0)


def history_in_chunk(hist: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Which history entries fall in items ``[start, stop)`` (``(Uc, H)`` bool) and their column in the chunk.

    Work is ``O(Uc * H)``: the history is looked up in the chunk's scores, never expanded to a chunk-wide mask.
    """
    inside = (hist >= start) & (hist < stop)  # padding 0 is never inside since start >= 1
    return inside, (hist - start).clamp_(0, stop - start - 1)


_WORD_BYTES = 8  # bools per int64 word
_WORDS_PER_SUM = 128  # int64 words added before their bytes are unpacked: a byte then holds at most 128 < 256
_BLOCK = _WORD_BYTES * _WORDS_PER_SUM  # bool columns per block: buffer widths are multiples of this


class _BeatsBuffer:
    """A reusable ``(rows, W)`` bool buffer for "beats the target" masks, counted per row without ``bool.sum``.

    ``bool.sum(1)`` converts every element to int64 and costs about as much as the matrix product that made the
    scores. Here the mask is read as int64 words, each holding 8 bools (bytes that are 0 or 1); adding up 128
    words at a time leaves each byte a count of at most 128, so no byte carries into its neighbour, and the
    bytes of the sums are then added up. On CPU this counts ~20x faster than ``bool.sum``; it is exact, and the
    byte order of the machine does not matter since every byte is added. Columns beyond the written width are
    kept False so that they never count.
    """

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        padded = -(-width // _BLOCK) * _BLOCK
        self._buffer = torch.zeros(rows, padded, dtype=torch.bool, device=device)
        self._width = 0  # columns that may hold True from the previous chunk

    def compare(self, scores: Tensor, threshold: Tensor, strict: bool) -> Tensor:
        """``scores > threshold`` (strict) or ``>=``, written into the buffer; returns the ``(R, Ic)`` view."""
        rows, width = scores.shape
        if width < self._width:  # a narrower chunk: clear what the previous one left beyond it
            self._buffer[:, width:self._width] = False
        self._width = width
        view = self._buffer[:rows, :width]
        (torch.gt if strict else torch.ge)(scores, threshold, out=view)
        return view

    def count(self, rows: int) -> Tensor:
        """``(rows,)`` long: the number of True in each of the first ``rows`` rows (after :meth:`compare`)."""
        words = self._buffer[:rows].view(torch.int64).view(rows, -1, _WORDS_PER_SUM)  # (R, W/1024, 128)
        return words.sum(2).view(torch.uint8).sum(1, dtype=torch.long)


def rank_targets(user_vecs: Tensor, item_vecs: Tensor, targets: Tensor, histories: Histories | None = None, *,
                 protocols: Iterable[str] = PROTOCOLS, ties: Ties = "pessimistic",
                 target_in_history: TargetInHistory = "keep", user_chunk: int = 256,
                 item_chunk: int = 65536) -> dict[str, Tensor]:
    """0-based rank of each user's target under each protocol, in one pass over the scores.

    Args:
        user_vecs: ``(U, D)`` user representations.
        item_vecs: ``(N+1, D)`` item vectors; row 0 is padding and never ranked.
        targets: ``(U,)`` the held-out item number of each user.
        histories: ``(U, H)`` 0-padded item numbers, or a list of U 1-D sequences; needed for exclude_history.
        protocols: any of ``"exclude_history"`` and ``"include_history"``.
        ties, target_in_history: see the module docstring.
        user_chunk, item_chunk: the score matrix is computed ``user_chunk x item_chunk`` at a time.

    Returns:
        ``{protocol: ranks}``, ``ranks`` a ``(U,)`` long tensor on ``user_vecs.device``, ``-1`` = miss.
    """
    protocols = list(dict.fromkeys(protocols))
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown or not protocols:
        raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {protocols}")
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    if target_in_history not in ("keep", "miss"):
        raise ValueError(f"target_in_history must be 'keep' or 'miss', got {target_in_history!r}")
    device = user_vecs.device
    targets = torch.as_tensor(targets, dtype=torch.long, device=device)
    _check_inputs(user_vecs, item_vecs, targets, user_chunk, item_chunk)
    item_vecs = item_vecs.to(device=device, dtype=user_vecs.dtype)
    num_users, num_rows = user_vecs.shape[0], item_vecs.shape[0]
    excluding = EXCLUDE_HISTORY in protocols
    hist = None
    if excluding:
        if histories is None:
            raise ValueError("exclude_history needs the users' histories")
        hist = pad_histories(histories, num_users, device)
        if hist.numel() and (int(hist.min()) < 0 or int(hist.max()) >= num_rows):
            raise ValueError(f"histories must hold item numbers in 0..{num_rows - 1} (0 = padding)")

    counts = {p: torch.zeros(num_users, dtype=torch.long, device=device) for p in protocols}
    first = _first_occurrences(hist) if excluding else None
    nan_target = torch.zeros(num_users, dtype=torch.bool, device=device)
    buffer = _BeatsBuffer(min(user_chunk, num_users), min(item_chunk, num_rows - 1), device)
    for u0 in range(0, num_users, user_chunk):
        u1 = min(u0 + user_chunk, num_users)
        users = user_vecs[u0:u1]  # (Uc, D)
        tgt = targets[u0:u1]  # (Uc,)
        # The target's score comes from a matrix product like the competitors' scores (not an elementwise
        # sum), so that it is rounded the same way (TF32 on GPU included) and exact ties stay ties.
        tgt_score = (users @ item_vecs[tgt].t()).diagonal().unsqueeze(1)  # (Uc, 1)
        nan_target[u0:u1] = tgt_score.squeeze(1).isnan()
        rows = torch.arange(u1 - u0, device=device)
        for i0 in range(1, num_rows, item_chunk):  # from 1: the padding row never competes
            i1 = min(i0 + item_chunk, num_rows)
            scores = users @ item_vecs[i0:i1].t()  # (Uc, Ic)
            beats = buffer.compare(scores, tgt_score, strict=ties == "optimistic")  # (Uc, Ic) bool
            own = (tgt >= i0) & (tgt < i1)  # (Uc,) the target lies in this chunk: it does not compete
            beats[rows[own], tgt[own] - i0] = False
            above = buffer.count(u1 - u0)  # (Uc,) competitors above the target, history included
            if INCLUDE_HISTORY in counts:
                counts[INCLUDE_HISTORY][u0:u1] += above
            if excluding:
                # Minus the distinct history items of this chunk that are among them (the target never is).
                inside, cols = history_in_chunk(hist[u0:u1], i0, i1)  # (Uc, H)
                own_history = (beats.gather(1, cols) & inside & first[u0:u1]).sum(1)
                counts[EXCLUDE_HISTORY][u0:u1] += above - own_history

    for ranks in counts.values():
        ranks[nan_target] = -1
    if excluding and target_in_history == "miss" and hist.shape[1] > 0:
        counts[EXCLUDE_HISTORY][(hist == targets.unsqueeze(1)).any(1)] = -1
    return counts


def full_rank(user_vecs: Tensor, item_vecs: Tensor, targets: Tensor, histories: Histories | None = None, *,
              exclude_history: bool = True, ties: Ties = "pessimistic", target_in_history: TargetInHistory = "keep",
              user_chunk: int = 256, item_chunk: int = 65536) -> Tensor:
    """``(U,)`` 0-based rank of each target under one protocol (-1 = miss); see :func:`rank_targets`."""
    protocol = EXCLUDE_HISTORY if exclude_history else INCLUDE_HISTORY
    return rank_targets(user_vecs, item_vecs, targets, histories, protocols=[protocol], ties=ties,
                        target_in_history=target_in_history, user_chunk=user_chunk,
                        item_chunk=item_chunk)[protocol]


def evaluate_rankings(user_vecs: Tensor, item_vecs: Tensor, targets: Tensor, histories: Histories,
                      ks: Iterable[int] = (5, 10, 20), *, ties: Ties = "pessimistic",
                      target_in_history: TargetInHistory = "keep", user_chunk: int = 256,
                      item_chunk: int = 65536) -> dict[str, dict[str, float]]:
    """HR@k, NDCG@k and MRR@k under both protocols, from one pass over the scores.

    Returns ``{"exclude_history": {"HR@10": ..., ...}, "include_history": {...}}`` (means over the users).
    To reduce across shards exactly, call :func:`rank_targets` per shard and add up
    :func:`pmmrec.evaluation.metrics.metric_sums` instead.
    """
    ranks = rank_targets(user_vecs, item_vecs, targets, histories, ties=ties, target_in_history=target_in_history,
                         user_chunk=user_chunk, item_chunk=item_chunk)
    ks = list(ks)
    return {protocol: metrics_from_ranks(ranks[protocol], ks) for protocol in PROTOCOLS}


def topk_items(user_vecs: Tensor, item_vecs: Tensor | ItemBlocks, k: int, exclude: Histories | None = None, *,
               user_chunk: int = 256, item_chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """The ``k`` best-scoring items of each user, best first, with a running top-K merge over item chunks.

    ``item_vecs``: ``(N+1, D)`` with row 0 the padding, or :class:`ItemBlocks` (chunks never cross a block).
    ``exclude`` (e.g. the users' histories) removes items from each user's candidates; padding row 0 is never
    returned. Returns ``(scores, items)``, both ``(U, k)``. When fewer than ``k`` items are left, the missing
    slots have score ``-inf`` and item 0. The order among exactly equal scores is unspecified.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    device = user_vecs.device
    if isinstance(item_vecs, Tensor):
        _check_inputs(user_vecs, item_vecs, None, user_chunk, item_chunk)
        item_vecs = item_vecs.to(device=device, dtype=user_vecs.dtype)  # once, not per chunk
    elif user_vecs.dim() != 2 or user_vecs.shape[1] != item_vecs.dim or item_vecs.count < 1 or user_chunk < 1 \
            or item_chunk < 1:
        raise ValueError(f"user_vecs must be (U, {item_vecs.dim}) over at least one item, and chunk sizes positive")
    items = ItemBlocks.of(item_vecs)
    num_users, num_rows = user_vecs.shape[0], items.num_rows
    excl = None if exclude is None else pad_histories(exclude, num_users, device)
    if excl is not None and excl.numel() and (int(excl.min()) < 0 or int(excl.max()) >= num_rows):
        raise ValueError(f"exclude must hold item numbers in 0..{num_rows - 1} (0 = padding)")

    out_scores = torch.full((num_users, k), float("-inf"), dtype=user_vecs.dtype, device=device)
    out_items = torch.zeros(num_users, k, dtype=torch.long, device=device)
    for u0 in range(0, num_users, user_chunk):
        u1 = min(u0 + user_chunk, num_users)
        users = user_vecs[u0:u1]  # (Uc, D)
        best_scores = out_scores[u0:u1, :0]  # (Uc, 0), grows to (Uc, <=k)
        best_items = out_items[u0:u1, :0]
        for i0, chunk in items.chunks(item_chunk):
            i1 = i0 + len(chunk)
            scores = users @ chunk.to(device=device, dtype=users.dtype).t()  # (Uc, Ic)
            if excl is not None:
                inside, cols = history_in_chunk(excl[u0:u1], i0, i1)  # (Uc, H)
                rows = torch.arange(u1 - u0, device=device).unsqueeze(1).expand_as(cols)  # (Uc, H)
                scores[rows[inside], cols[inside]] = float("-inf")
            chunk_scores, chunk_idx = scores.topk(min(k, i1 - i0), dim=1)  # (Uc, <=k)
            merged_scores = torch.cat([best_scores, chunk_scores], dim=1)  # (Uc, <=2k)
            merged_items = torch.cat([best_items, chunk_idx + i0], dim=1)
            best_scores, pick = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)  # (Uc, <=k)
            best_items = merged_items.gather(1, pick)
        width = best_scores.shape[1]
        out_scores[u0:u1, :width] = best_scores
        out_items[u0:u1, :width] = torch.where(best_scores == float("-inf"), 0, best_items)
    return out_scores, out_items
