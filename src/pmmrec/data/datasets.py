"""Torch datasets over a leave-one-out split: training windows and evaluation sequences (docs/design.md §3).

Training: windows of ``max_seq_len + 1`` items of a training sequence, left-padded with 0; positions 0..L-1 are
inputs and 1..L are their next-item targets; ``train.windows`` decides which windows (:class:`TrainWindows`).
Evaluation: the ``max_seq_len`` items before the target are the input; every earlier item is the history that the
``exclude_history`` protocol removes from the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from pmmrec.data.batch import ItemInputs
from pmmrec.data.item_features import ItemFeatureStore


def left_pad(seq: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` items of ``seq``, left-padded with 0 to exactly ``length``."""
    out = np.zeros(length, dtype=np.int64)
    tail = seq[-length:] if length > 0 else seq[:0]
    out[length - len(tail):] = tail
    return out


WINDOW_MODES = ("all", "last", "random")


def tile_ends(length: int, max_seq_len: int) -> list[int]:
    """Where the windows that tile a training sequence of ``length`` items end (exclusive), newest first.

    A window ending at ``e`` holds items ``e - L - 1 .. e - 1`` and predicts items ``e - L .. e - 1``; ends step
    down by ``L``, so every item but the first (which has no input before it) is a target exactly once.
    """
    return list(range(length, 1, -max_seq_len))


class TrainWindows(Dataset):
    """(L+1,) windows of item numbers, left-padded; ``owner[w]`` is the user of window ``w``.

    ``mode`` (``train.windows``): ``all`` tiles every training sequence (:func:`tile_ends`), ``last`` is one window
    per user ending at its last training item (the reference code), ``random`` one window per user ending at a
    position drawn anew each epoch (:meth:`set_epoch`) from ``(seed, epoch)``. The number of windows is the same
    every epoch, so an epoch's batch plan depends on (seed, epoch) alone.
    """

    def __init__(self, train: list[np.ndarray], max_seq_len: int, mode: str = "last", seed: int = 0):
        if mode not in WINDOW_MODES:
            raise ValueError(f"train.windows must be one of {list(WINDOW_MODES)}, got {mode!r}")
        self.train, self.max_seq_len, self.mode, self.seed = train, max_seq_len, mode, seed
        if mode == "all":
            pairs = [(u, e) for u, seq in enumerate(train) for e in (tile_ends(len(seq), max_seq_len) or [len(seq)])]
        else:
            pairs = [(u, len(seq)) for u, seq in enumerate(train)]
        self.owner = np.array([u for u, _ in pairs], dtype=np.int64)
        self._build([e for _, e in pairs])
        self.epoch = None

    def _build(self, ends: list[int]) -> None:
        L = self.max_seq_len
        self.windows = np.stack([left_pad(self.train[u][max(0, e - L - 1):e], L + 1)
                                 for u, e in zip(self.owner.tolist(), ends, strict=True)]) if ends else \
            np.zeros((0, L + 1), dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """``random`` windows: draw this epoch's window ends (a no-op for the other modes)."""
        if self.mode != "random" or self.epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        # An end e in [2, n]: at least one input and one target (a one-item sequence keeps its only window).
        ends = [int(rng.integers(2, len(seq) + 1)) if len(seq) >= 2 else len(seq) for seq in self.train]
        self._build(ends)
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.windows[index]


@dataclass
class SequenceBatch:
    """A batch of windows plus the inputs of its UNIQUE items (each distinct item is encoded once)."""

    items: torch.Tensor  # (B, L+1) item numbers, 0 = padding
    unique: torch.Tensor  # (U,) distinct item numbers of the batch
    inverse: torch.Tensor  # (B, L+1) position of each slot's item in `unique`
    inputs: ItemInputs  # features of `unique`

    def to(self, device, non_blocking: bool = False) -> SequenceBatch:
        return SequenceBatch(self.items.to(device, non_blocking=non_blocking),
                             self.unique.to(device, non_blocking=non_blocking),
                             self.inverse.to(device, non_blocking=non_blocking),
                             self.inputs.to(device, non_blocking=non_blocking))


class WindowCollator:
    """Stacks windows and looks up the features of the batch's unique items (picklable for workers).

    ``naive`` (the reference code's behaviour, kept for ``pmmrec bench train``): every slot's item is looked up
    and encoded, repeats included. ``unique`` then holds every slot (sorted, with repeats), so the gathers and
    look-ups downstream are the same code and give the same values.
    """

    def __init__(self, store: ItemFeatureStore | None, naive: bool = False):
        self.store, self.naive = store, naive

    def __call__(self, windows: list[np.ndarray]) -> SequenceBatch:
        items = torch.from_numpy(np.stack(windows))  # (B, L+1)
        if self.naive:
            unique, order = items.reshape(-1).sort(stable=True)  # (B * (L+1),) every occurrence
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order))
            inverse = inverse.view_as(items)
        else:
            unique, inverse = torch.unique(items, return_inverse=True)
        inputs = self.store.lookup(unique) if self.store is not None else ItemInputs(items=unique)
        return SequenceBatch(items, unique, inverse, inputs)


@dataclass
class EvalSequences:
    """Inputs, targets and histories of one evaluation split (validation or test)."""

    inputs: torch.Tensor  # (U, L) left-padded item numbers before the target
    targets: torch.Tensor  # (U,)
    histories: list[torch.Tensor]  # every item before the target (for exclude_history)

    @classmethod
    def from_sequences(cls, sequences: list[np.ndarray], max_seq_len: int) -> EvalSequences:
        """``sequences[u]`` ends with the target; what precedes it is input (last L) and history (all)."""
        inputs = np.stack([left_pad(s[:-1], max_seq_len) for s in sequences]) if sequences else \
            np.zeros((0, max_seq_len), dtype=np.int64)
        targets = np.array([s[-1] for s in sequences], dtype=np.int64)
        histories = [torch.from_numpy(np.asarray(s[:-1], dtype=np.int64)) for s in sequences]
        return cls(torch.from_numpy(inputs), torch.from_numpy(targets), histories)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, users: np.ndarray) -> EvalSequences:
        index = torch.as_tensor(np.asarray(users, dtype=np.int64))
        return EvalSequences(self.inputs[index], self.targets[index], [self.histories[i] for i in index.tolist()])
