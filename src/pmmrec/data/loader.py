"""The epoch's training batches: which users go together, in which order, on which rank (docs/design.md §6).

The order of an epoch is a function of (seed, epoch) alone, so a resumed run replays the same batches and skips
the ones it already trained. ``data.mix: per_domain`` (pretraining) keeps every batch inside one source domain, so
that in-batch negatives come from the same domain. Under torchrun ``train.batch_size`` is the *global* batch:
every rank computes the same plan and takes its contiguous slice of each batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from pmmrec.data.datasets import SequenceBatch, TrainWindows, WindowCollator
from pmmrec.data.item_features import ItemFeatureStore
from pmmrec.data.sources import DomainView
from pmmrec.runtime import distributed


class _RankCollator:
    """The window collator, plus one all-padding window for an empty slice (picklable for workers).

    A rank whose slice of the global batch is empty (the epoch's last batch has fewer users than there are ranks)
    still takes part in every collective: it trains one all-padding window, which has no position to predict and
    contributes nothing but zeros.
    """

    def __init__(self, collate: WindowCollator, slots: int):
        self.collate, self.slots = collate, slots

    def __call__(self, windows: list[np.ndarray]) -> SequenceBatch:
        return self.collate(windows if windows else [np.zeros(self.slots, dtype=np.int64)])


class TrainBatches:
    """The batches of every epoch over ``windows``; ``len()`` is the number of batches per epoch."""

    def __init__(self, windows: TrainWindows, store: ItemFeatureStore | None, *, batch_size: int, seed: int,
                 views: list[DomainView] | None = None, mix: str = "mixed", num_workers: int = 0,
                 pin_memory: bool = False):
        self.windows, self.store = windows, store
        self.batch_size, self.seed, self.views, self.mix = batch_size, seed, views, mix
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.world, self.rank = distributed.world_size(), distributed.rank()
        # Per source domain, its windows (a window belongs to its user's domain).
        self._view_windows = [np.flatnonzero(np.isin(windows.owner, view.users)) for view in views or []]
        self._len = len(self.plan(0))  # the same every epoch

    def __len__(self) -> int:
        return self._len

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's batches (lists of window indices) in a (seed, epoch)-determined order; under torchrun, this
        rank's slice of each (possibly empty in a last batch with fewer users than ranks)."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        size = self.batch_size
        if self.views is None or self.mix == "mixed":
            order = torch.randperm(len(self.windows), generator=generator).tolist()
            plan = [order[i:i + size] for i in range(0, len(order), size)]
        else:
            plan = []
            for windows in self._view_windows:
                windows = windows[torch.randperm(len(windows), generator=generator).numpy()].tolist()
                plan += [windows[i:i + size] for i in range(0, len(windows), size)]
            plan = [plan[i] for i in torch.randperm(len(plan), generator=generator).tolist()]
        return plan if self.world == 1 else [self._my_slice(batch) for batch in plan]

    def _my_slice(self, batch: list[int]) -> list[int]:
        sizes = distributed.shard_sizes(len(batch), self.world)
        start = sum(sizes[:self.rank])
        return batch[start:start + sizes[self.rank]]

    def epoch(self, epoch: int, skip: int = 0) -> DataLoader:
        """The epoch's batches, skipping the first ``skip`` (resume)."""
        # A generator of its own, so creating the loader never draws from the global RNG (exact resume).
        self.windows.set_epoch(epoch)  # train.windows=random: this epoch's windows, from (seed, epoch)
        slots = self.windows.windows.shape[1]
        return DataLoader(self.windows, batch_sampler=self.plan(epoch)[skip:],
                          collate_fn=_RankCollator(WindowCollator(self.store), slots),
                          num_workers=self.num_workers, generator=torch.Generator().manual_seed(epoch),
                          pin_memory=self.pin_memory, persistent_workers=False)
