"""One catalogue for several processes: a vector store that each memory-maps, follows and appends to (docs/design.md §8).

``pmmrec serve --workers N`` runs N processes over one catalogue. Each would otherwise hold its own copy of the
item vectors and its own list of added items. Instead every process reads the same vector store
(:mod:`pmmrec.inference.vector_store`, append-only, a ``version`` raised by every commit):

* **Mapped, not copied.** :meth:`SharedStore.open` reads the store under its lock (sizes and SHA-256 checked) and
  returns its segments' vectors as read-only memory maps (the first segment, and the large ones right after it;
  segments under :data:`MAP_MIN_ROWS` rows are copied into one block). The operating system keeps one copy of
  the mapped files in its page cache for all processes.
* **Followed.** :meth:`SharedStore.new_rows` compares the manifest's :meth:`~VectorStore.stamp` (inode, size,
  times: one ``stat``) with the last one seen, and only when it changed (or every :data:`FORCE_EVERY` polls, in
  case a replacement kept all of them) reads ``store.json``; a larger ``version`` whose segments extend those
  known gives the rows past them, read from the new segments only (with their titles and images, from each
  segment's content file). A store rewritten rather than appended to (another start synced it with a changed
  domain) is :class:`StoreDiverged`: the process keeps serving what it has.
* **Appended under the lock.** A process adding items takes the store's lock, catches up with
  :meth:`new_rows`, refuses ids the store holds (whoever added them), appends one segment (vectors, digests,
  titles and images) and commits; the other processes pick the items up at their next poll.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pmmrec.inference.vector_store import Content, StoreError, StoreKey, VectorStore

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.25  # seconds between two looks at store.json (a stat; the manifest is read only when it changed)
FORCE_EVERY = 8  # read the manifest every this many polls even when the stat looks the same (2 s)
MAP_MIN_ROWS = 4096  # segments of at least this many rows (and the first) are memory-mapped; smaller are copied


class StoreDiverged(StoreError):
    """The store was rewritten (or made for another model) rather than appended to: its rows no longer extend
    the ones this process serves."""


@dataclass
class Attached:
    """A store as :meth:`SharedStore.open` read it: every item id in order, their vectors as blocks, and the
    titles and images kept with items added at run time."""

    ids: list[str]
    blocks: list[np.ndarray]  # (n_b, D) float32 each: read-only memory maps, then at most one in-memory copy
    content: dict[str, Content] = field(default_factory=dict)
    version: int = 0


@dataclass
class NewRows:
    """Rows of the store past those a process had: ids, ``(n, D)`` vectors (a copy), titles and images."""

    ids: list[str]
    vectors: np.ndarray
    content: dict[str, Content]
    version: int


class SharedStore:
    """One process's view of a vector store shared with others: the segments and rows it knows (module docstring).

    Not thread-safe by itself: the :class:`~pmmrec.inference.Recommender` serialises the calls.
    """

    def __init__(self, store: VectorStore, key: StoreKey):
        self.store, self.key = store, key
        self.version = 0  # the store version this process is in step with
        self._segments: list[dict] = []  # the manifest's entries for the rows known, in order
        self._count = 0  # rows known
        self._stamp: tuple[int, ...] | None = None
        self._polls = 0

    def __repr__(self) -> str:
        return f"SharedStore({str(self.store.path)!r}, version {self.version})"

    @property
    def count(self) -> int:
        return self._count

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The store's writer lock (``flock``); :class:`StoreError` if the folder cannot hold one."""
        try:
            with self.store.lock():
                yield
        except OSError as e:
            raise StoreError(f"{self.store.path}: cannot lock the vector store ({e.strerror or e})") from None

    def open(self, required: Sequence[str] = ()) -> Attached | None:
        """Read the whole store, checked, as blocks (see the module docstring); None when there is no store, it
        has another key, it is damaged, or it lacks some of the ``required`` ids (the caller then syncs it)."""
        with contextlib.ExitStack() as stack:
            with contextlib.suppress(OSError):  # a read-only folder: no writer can change it either
                stack.enter_context(self.store.lock())
            if not self.store.exists():
                return None
            try:
                stamp = self.store.stamp()
                data = self.store.manifest()
                differences = StoreKey.from_dict(data["key"]).differences(self.key)
                if differences:
                    log.info("vector store %s: another model's (%s)", self.store.path, "; ".join(differences[:2]))
                    return None
                segments = list(data["segments"])
                parts = self.store.read_segments(data, segments, verify=True)
                content = {}
                for segment in segments:
                    content.update(self.store.read_content(segment))
            except StoreError as e:
                log.warning("vector store %s cannot be shared as it is: %s", self.store.path, e)
                return None
        ids = [i for seg_ids, _, _ in parts for i in seg_ids]
        if len(set(ids)) != len(ids):
            log.warning("vector store %s holds an item id twice; rebuilding it", self.store.path)
            return None
        missing = set(required).difference(ids)
        if missing:
            log.info("vector store %s lacks %d item(s) of the catalogue (e.g. %r): bringing it in step",
                     self.store.path, len(missing), sorted(missing)[0])
            return None
        mapped = 1
        while mapped < len(parts) and len(parts[mapped][0]) >= MAP_MIN_ROWS:
            mapped += 1
        blocks = [vectors for _, _, vectors in parts[:mapped]]
        if mapped < len(parts):  # small segments (items added at run time): one copied block
            blocks.append(np.concatenate([np.asarray(vectors) for _, _, vectors in parts[mapped:]]))
        self._segments, self._count = segments, len(ids)
        self.version, self._stamp = int(data["version"]), stamp
        log.info("vector store %s: version %d, %d items shared (%d mapped)", self.store.path, self.version,
                 len(ids), sum(len(b) for b in blocks[:mapped]))
        return Attached(ids, blocks, content, self.version)

    def new_rows(self, known_ids: Sequence[str], force: bool = False) -> NewRows | None:
        """The rows committed since this process last looked, or None when there are none.

        ``known_ids``: the ids of the rows this process serves (its catalogue's, in order), to check that the
        store still extends them. ``force`` reads the manifest even when its stat is unchanged (the caller holds
        the lock and is about to append). Raises :class:`StoreDiverged` when the store no longer extends them.
        """
        self._polls += 1
        stamp = self.store.stamp()
        if not force and stamp == self._stamp and self._polls % FORCE_EVERY:
            return None
        data = self.store.manifest()
        version = int(data["version"])
        if version == self.version:
            self._stamp = stamp
            return None
        if StoreKey.from_dict(data["key"]) != self.key:
            raise StoreDiverged(f"{self.store.path}: the store now holds another model's vectors")
        segments = list(data["segments"])
        same = 0  # segments known and unchanged (the common case: all of them)
        while same < min(len(segments), len(self._segments)) and segments[same] == self._segments[same]:
            same += 1
        if same == 0 and self._segments:
            raise StoreDiverged(f"{self.store.path}: the store was rewritten (version {version}); this process "
                                f"keeps serving version {self.version}")
        done = sum(int(s["rows"]) for s in self._segments[:same])
        parts = self.store.read_segments(data, segments[same:], verify=True)
        ids = [i for seg_ids, _, _ in parts for i in seg_ids]
        skip = self._count - done  # rows of ours that the later segments hold again (merged after 16 segments)
        if ids[:skip] != list(known_ids[done:self._count]):
            raise StoreDiverged(f"{self.store.path}: the store was rewritten (version {version}); this process "
                                f"keeps serving version {self.version}")
        content = {}
        for segment in segments[same:]:
            content.update(self.store.read_content(segment))
        fresh = ids[skip:]
        vectors = np.concatenate([np.asarray(v) for _, _, v in parts])[skip:] if parts else \
            np.zeros((0, self.key.dim), dtype=np.float32)
        self._segments, self._count = segments, self._count + len(fresh)
        self.version, self._stamp = version, stamp
        if not fresh:
            return None
        return NewRows(fresh, np.array(vectors, dtype=np.float32), {i: content[i] for i in fresh if i in content},
                       version)

    def append(self, ids: Sequence[str], digests: np.ndarray, vectors: np.ndarray,
               content: Sequence[Content]) -> int:
        """Commit new items (the caller holds :meth:`locked` and has caught up with :meth:`new_rows`); returns the
        store's new version."""
        version = self.store.append(self.key, ids, digests, vectors, content)
        data = self.store.manifest()
        self._segments, self._count = list(data["segments"]), self._count + len(ids)
        self.version, self._stamp = version, self.store.stamp()
        return version
