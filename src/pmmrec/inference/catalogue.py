"""The recommender's item catalogue: raw ids, titles, where images live, and one vector per item.

Items can be added while other threads recommend (docs/design.md §13: the service survives concurrent load).
The catalogue is append-only and published through immutable :class:`Snapshot` objects: a writer fills rows past
the published count of a preallocated buffer, then swaps in a new snapshot with the larger count in one
reference assignment. A reader takes one snapshot and sees a consistent catalogue for its whole request (the
rows it reads are never written again); when the buffer is full a writer copies it into a larger one, and old
snapshots keep the old buffer. Writers are serialised by a lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from pmmrec.data.image_db import ImageDB
from pmmrec.errors import PmmrecError


class DuplicateItemsError(PmmrecError):
    """New items whose ids the catalogue already has."""


@dataclass(frozen=True)
class Snapshot:
    """A consistent view of the catalogue: items 1..``count`` (0 is padding)."""

    count: int
    buffer: Tensor  # (capacity + 1, D); rows 0..count are valid, row 0 is the zero padding vector
    ids: list[str]  # shared and append-only: ids[i - 1] is item i; entries past ``count`` are not visible
    index: dict[str, int]  # shared: raw id -> item number; numbers past ``count`` are not visible

    @property
    def vectors(self) -> Tensor:
        """(count + 1, D) item vectors, row 0 = padding."""
        return self.buffer[: self.count + 1]

    def number(self, item_id: str) -> int | None:
        number = self.index.get(item_id)
        return number if number is not None and number <= self.count else None

    def item_id(self, number: int) -> str:
        return self.ids[number - 1]


@dataclass(frozen=True)
class ItemInfo:
    """What the catalogue knows about one item."""

    item_id: str
    number: int  # 1-based position in the catalogue
    title: str | None  # None when the catalogue was loaded without titles (an ID-tower checkpoint alone)
    has_image: bool
    added: bool  # added after loading (cold start), rather than read from the domain folder


class Catalogue:
    """Append-only, thread-safe item catalogue (see the module docstring)."""

    def __init__(self, ids: Sequence[str], vectors: Tensor, titles: Sequence[str | None] | None = None,
                 image_refs: Sequence[tuple[Path | None, str]] | None = None,
                 images_present: set[str] | None = None):
        if vectors.dim() != 2 or len(vectors) != len(ids) + 1:
            raise ValueError(f"vectors must be (N+1, D) for N={len(ids)} items, got {tuple(vectors.shape)}")
        self._ids = list(ids)
        self._index = {iid: i + 1 for i, iid in enumerate(self._ids)}
        self._titles: list[str | None] = list(titles) if titles is not None else [None] * len(self._ids)
        # Where each catalogue item's image lives, (LMDB folder, key); added items keep their bytes in memory.
        self._refs: list[tuple[Path | None, str] | None] = list(image_refs) if image_refs is not None else \
            [None] * len(self._ids)
        present = images_present or set()
        self._has_image = [ref is not None and ref[0] is not None and iid in present
                           for iid, ref in zip(self._ids, self._refs, strict=True)]
        self._added_images: dict[int, bytes] = {}
        self._loaded = len(self._ids)
        self._lock = threading.Lock()
        buffer = vectors.new_zeros(len(vectors) + max(64, len(vectors) // 4), vectors.shape[1])
        buffer[: len(vectors)] = vectors
        self._snapshot = Snapshot(len(self._ids), buffer, self._ids, self._index)

    def snapshot(self) -> Snapshot:
        return self._snapshot  # one attribute read: atomic

    def __len__(self) -> int:
        return self._snapshot.count

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self._snapshot.number(item_id) is not None

    @property
    def dim(self) -> int:
        return int(self._snapshot.buffer.shape[1])

    def existing(self, ids: Sequence[str]) -> list[str]:
        """Those of ``ids`` that are already in the catalogue."""
        snap = self._snapshot
        return [iid for iid in ids if snap.number(iid) is not None]

    def append(self, ids: Sequence[str], vectors: Tensor, titles: Sequence[str | None],
               images: Sequence[bytes | None]) -> Snapshot:
        """Add items (ids not in the catalogue) with their vectors; returns the snapshot that shows them."""
        with self._lock:
            taken = self.existing(ids)
            if taken:
                raise DuplicateItemsError(f"item id(s) already in the catalogue: {', '.join(map(repr, taken[:5]))}")
            old = self._snapshot
            start, n = old.count + 1, len(ids)
            buffer = old.buffer
            if start + n > len(buffer):  # full: a larger copy; readers of ``old`` keep the old buffer
                buffer = buffer.new_zeros(max(2 * len(buffer), start + n), buffer.shape[1])
                buffer[:start] = old.buffer[:start]
            buffer[start:start + n] = vectors.to(buffer.dtype)
            for offset, (iid, title, image) in enumerate(zip(ids, titles, images, strict=True)):
                self._ids.append(iid)
                self._titles.append(title)
                self._refs.append(None)
                self._has_image.append(image is not None)
                if image is not None:
                    self._added_images[start + offset] = image
                self._index[iid] = start + offset
            self._snapshot = Snapshot(old.count + n, buffer, self._ids, self._index)
            return self._snapshot

    def info(self, item_id: str) -> ItemInfo | None:
        number = self._snapshot.number(item_id)
        if number is None:
            return None
        return ItemInfo(item_id, number, self._titles[number - 1], self._has_image[number - 1],
                        number > self._loaded)

    def image(self, item_id: str) -> bytes | None:
        """The encoded image bytes of an item (from memory for added items, else from its LMDB), or None."""
        number = self._snapshot.number(item_id)
        if number is None:
            return None
        if number > self._loaded:
            return self._added_images.get(number)
        ref = self._refs[number - 1]
        if ref is None or ref[0] is None:
            return None
        db = ImageDB(ref[0])
        try:
            return db.get(ref[1])
        finally:
            db.close()  # no handle stays open: persisting new items opens the same LMDB for writing
