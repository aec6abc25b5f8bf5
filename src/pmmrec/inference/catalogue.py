"""The recommender's item catalogue: raw ids, titles, where images live, and one vector per item.

Items can be added while other threads recommend (docs/design.md §13: the service survives concurrent load).
The catalogue is append-only and published through immutable :class:`Snapshot` objects. Its vectors are
:class:`~pmmrec.evaluation.ranking.ItemBlocks`: the *base* blocks it was made with, never copied (read-only memory
maps of a vector store's segments when several processes serve one store, docs/design.md §8), then a *tail* of
the items appended since, in a preallocated buffer. A writer fills tail rows past the published count, then swaps
in a new snapshot with the larger count in one reference assignment. A reader takes one snapshot and sees a
consistent catalogue for its whole request (the rows it reads are never written again); when the tail buffer is
full a writer copies it into a larger one, and old snapshots keep the old buffer. Writers are serialised by a lock.

The ids and titles are held the same way (:mod:`pmmrec.inference.item_ids`): the base packed into arrays (every
serving process holds them: as Python objects they took 228 bytes an item), the items appended since in small
lists; a snapshot numbers only its ``count`` items.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pmmrec.data.image_db import ImageDB
from pmmrec.evaluation.ranking import ItemBlocks
from pmmrec.inference.item_ids import DuplicateItemsError, IdsView, ItemIds, PackedStrings


@dataclass(frozen=True)
class Snapshot:
    """A consistent view of the catalogue: items 1..``count`` (0 is padding)."""

    count: int
    items: ItemBlocks  # the vectors of items 1..count: base blocks (maybe memory maps), then the added tail
    table: ItemIds  # shared and append-only: ids numbered past ``count`` are not visible

    @property
    def ids(self) -> IdsView:
        """Items 1..count's ids: ``ids[i - 1]`` is item ``i``; slices are lists."""
        return self.table.view(self.count)

    @property
    def vectors(self) -> Tensor:
        """A ``(count + 1, D)`` float32 copy, row 0 = padding: for inspection (requests read :attr:`items`)."""
        return self.items.dense()

    def number(self, item_id: str) -> int | None:
        number = self.table.number(item_id)
        return number if number is not None and number <= self.count else None

    def numbers(self, ids: Sequence[str]) -> np.ndarray:
        """``(len(ids),)`` int64: the number of each id (strings), 0 where this snapshot has none."""
        out = self.table.numbers(ids)
        out[out > self.count] = 0
        return out

    def item_id(self, number: int) -> str:
        if not 1 <= number <= self.count:
            raise IndexError(f"item number {number} out of range 1..{self.count}")
        return self.table.item_id(number)


@dataclass(frozen=True)
class ItemInfo:
    """What the catalogue knows about one item."""

    item_id: str
    number: int  # 1-based position in the catalogue
    title: str | None  # None when the catalogue was loaded without titles (an ID-tower checkpoint alone)
    has_image: bool
    added: bool  # added after loading (cold start), rather than read from the domain folder


class ImageRefs:
    """Where each item's image lives, (LMDB folder, key) or None, held compactly: a catalogue of a million items
    would otherwise keep a million tuples (~64 bytes each, in every serving process). Each item has one 4-byte
    number naming its database among the few distinct ones, and its key is kept only where it is not the item's id
    (an LMDB written by pmmrec keys images by item id)."""

    def __init__(self, ids: Sequence[str], refs: Sequence[tuple[Path | None, str] | None]):
        self._dbs: list[Path | None] = []
        self._positions: dict[Path | None, int] = {}
        self._which = array("i")  # index into _dbs; -1: no reference
        self._keys: dict[int, str] = {}  # item index -> key, where the key is not the item id
        for iid, ref in zip(ids, refs, strict=True):
            self.append(iid, ref)

    def __len__(self) -> int:
        return len(self._which)

    def append(self, item_id: str, ref: tuple[Path | None, str] | None) -> None:
        if ref is None:
            self._which.append(-1)
            return
        db, key = ref
        position = self._positions.get(db)
        if position is None:
            position = self._positions[db] = len(self._dbs)
            self._dbs.append(db)
        if key != item_id:
            self._keys[len(self._which)] = key
        self._which.append(position)

    def get(self, index: int, item_id: str) -> tuple[Path | None, str] | None:
        """The reference of item ``index`` (0-based), whose id is ``item_id``."""
        position = self._which[index]
        if position < 0:
            return None
        return self._dbs[position], self._keys.get(index, item_id)


class Catalogue:
    """Append-only, thread-safe item catalogue (see the module docstring)."""

    def __init__(self, ids: Sequence[str], vectors: Tensor | Sequence[Tensor],
                 titles: Sequence[str | None] | None = None,
                 image_refs: Sequence[tuple[Path | None, str] | None] | None = None,
                 images_present: set[str] | None = None, *, images: Mapping[str, bytes] | None = None,
                 added: Sequence[bool] | None = None):
        """``vectors``: an ``(N+1, D)`` tensor with row 0 the padding, or the ``(n_b, D)`` blocks of items 1..N in
        order (e.g. memory maps); either way they are kept as they are, never copied, and never written.

        ``image_refs``: where each item's image lives, (LMDB folder, key), or None; ``images_present``: the keys
        those LMDBs hold. ``images``: encoded images held in memory, by id (items added at run time), and
        ``added``: which items were added at run time rather than read from the domain folder (default none).
        """
        n = len(ids)
        if isinstance(vectors, Tensor):
            if vectors.dim() != 2 or len(vectors) != n + 1:
                raise ValueError(f"vectors must be (N+1, D) for N={n} items, got {tuple(vectors.shape)}")
            base, dim = (vectors[1:],), int(vectors.shape[1])
        else:
            base = tuple(vectors)
            if not base or sum(len(b) for b in base) != n:
                raise ValueError(f"vector blocks must hold {n} rows in all, got {[tuple(b.shape) for b in base]}")
            dim = int(base[0].shape[1])
        self._base = tuple(b for b in base if len(b))
        self._dim = dim
        refs = image_refs if image_refs is not None else [None] * n
        if not (titles is None or len(titles) == n) or len(refs) != n or not (added is None or len(added) == n):
            raise ValueError(f"titles, image_refs and added must have one entry per item ({n})")
        # Ids and titles packed into arrays (item_ids.py): a million in 68 MiB rather than 218 as Python objects.
        self._ids = ItemIds(ids)
        self._titles = PackedStrings(titles if titles is not None else [None] * n)
        # Where each item's image lives, (LMDB folder, key); items added at run time keep their bytes in memory.
        self._refs = ImageRefs(ids, refs)
        self._added = bytearray(map(bool, added)) if added is not None else bytearray(n)  # one byte an item
        present = images_present or set()
        self._images: dict[int, bytes] = {}  # item number -> encoded image
        for iid, data in (images or {}).items():
            number = self._ids.number(iid)
            if number is None:
                raise ValueError(f"an image is given for {iid!r}, which is not in the catalogue")
            self._images[number] = data
        self._has_image = bytearray((ref is not None and ref[0] is not None and iid in present) or i + 1 in self._images
                                    for i, (iid, ref) in enumerate(zip(ids, refs, strict=True)))
        del refs
        self._lock = threading.Lock()
        self._tail = torch.zeros(64, dim)  # rows of appended items; snapshots view its first rows
        self._tail_count = 0
        self._snapshot = Snapshot(n, ItemBlocks(self._base, dim), self._ids)

    def snapshot(self) -> Snapshot:
        return self._snapshot  # one attribute read: atomic

    def __len__(self) -> int:
        return self._snapshot.count

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self._snapshot.number(item_id) is not None

    @property
    def dim(self) -> int:
        return self._dim

    def existing(self, ids: Sequence[str]) -> list[str]:
        """Those of ``ids`` that are already in the catalogue."""
        ids = list(ids)
        return [iid for iid, number in zip(ids, self._snapshot.numbers(ids).tolist(), strict=True) if number]

    def append(self, ids: Sequence[str], vectors: Tensor, titles: Sequence[str | None],
               images: Sequence[bytes | None]) -> Snapshot:
        """Add items (ids not in the catalogue) with their ``(n, D)`` vectors; returns the snapshot that shows them."""
        with self._lock:
            taken = self.existing(ids)
            if taken:
                raise DuplicateItemsError(f"item id(s) already in the catalogue: {', '.join(map(repr, taken[:5]))}")
            old = self._snapshot
            start, n, used = old.count + 1, len(ids), self._tail_count
            if not len(titles) == len(images) == n or tuple(vectors.shape) != (n, self._dim):
                raise ValueError(f"{n} new items need {n} titles, {n} images and ({n}, {self._dim}) vectors")
            tail = self._tail
            if used + n > len(tail):  # full: a larger copy; readers of ``old`` keep the old buffer
                tail = tail.new_zeros(max(2 * len(tail), used + n), self._dim)
                tail[:used] = self._tail[:used]
                self._tail = tail
            tail[used:used + n] = vectors.to(tail.dtype)  # rows past the published count: no reader sees them
            self._ids.append(ids)  # checks them again (one id given twice) before appending any
            self._tail_count = used + n
            for offset, (iid, title, image) in enumerate(zip(ids, titles, images, strict=True)):
                self._titles.append(title)
                self._refs.append(iid, None)
                self._added.append(True)
                self._has_image.append(image is not None)
                if image is not None:
                    self._images[start + offset] = image
            items = ItemBlocks(self._base + (tail[:used + n],), self._dim)
            self._snapshot = Snapshot(old.count + n, items, self._ids)
            return self._snapshot

    def info(self, item_id: str) -> ItemInfo | None:
        number = self._snapshot.number(item_id)
        if number is None:
            return None
        return ItemInfo(item_id, number, self._titles[number - 1], bool(self._has_image[number - 1]),
                        bool(self._added[number - 1]))

    def image(self, item_id: str) -> bytes | None:
        """The encoded image bytes of an item (from memory for added items, else from its LMDB), or None."""
        number = self._snapshot.number(item_id)
        if number is None:
            return None
        if number in self._images:
            return self._images[number]
        ref = self._refs.get(number - 1, item_id)
        if ref is None or ref[0] is None:
            return None
        db = ImageDB(ref[0])
        try:
            return db.get(ref[1])
        finally:
            db.close()  # no handle stays open: persisting new items opens the same LMDB for writing
