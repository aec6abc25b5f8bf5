"""The catalogue vector store: item vectors on disk, keyed by the model and by each item's content (docs/design.md §8).

Encoding a catalogue through the image and text encoders is what makes a recommender slow to start (about 18 ms
an item on one CPU thread with the default encoders). A store keeps the vectors of a catalogue so that a restart,
another worker or another machine reads them instead. It is a folder::

    store.json              the manifest; rewritten last by every change (the commit point)
    <S>.vectors.npy         (n, D) float32 vectors of segment S, row-major: np.load(..., mmap_mode="r") maps it
    <S>.ids.txt             the segment's raw item ids, one per line (UTF-8), in row order
    <S>.digests.npy         (n, 16) uint8: each item's content digest (what its vector was computed from)
    <S>.items.jsonl         optional: titles and images of items added at run time (one JSON object a line:
                            ``{"id", "title", "image": base64 or null}``), for the other processes serving the store

The manifest (JSON) holds ``format``, ``format_version``, ``version`` (bumped by every commit), ``count`` and
``dim``, the ``key`` the vectors were computed under (:class:`StoreKey`: a digest of the item encoder's weights,
the dimension, the item tower and the preprocessing of titles and images), and the ordered ``segments``, each with
its row count and the byte size and SHA-256 of each of its files (``items``, the content file, only for segments
that have one). The store's items are the segments' rows in order; an id appears once.

*Writes are atomic.* Segment files are immutable and named by a number never used before in the folder; each is
written to a temporary name and renamed, and only then is the manifest replaced (temporary name, rename), so a
crash leaves either the old store or the new one, plus unreferenced files that the next rewrite removes.
:meth:`VectorStore.write` replaces the whole store with one segment; :meth:`VectorStore.append` adds a segment
(merging the segments after the first when there are too many), leaving the existing ones untouched. Writers
take an exclusive ``flock`` on ``.lock`` in the folder.

*Reads verify.* A missing file, a size that differs from the manifest's (truncation), a SHA-256 that differs (a
flipped byte) or an ``.npy`` header that does not match is a :class:`StoreError`; nothing unverified is served.

Several processes serve one store (:mod:`pmmrec.inference.shared_store`): each memory-maps its segments, polls
``store.json`` (:meth:`VectorStore.stamp`) and, when ``version`` grew, reads the rows past those it has; items
added at run time are appended under the lock, with their titles and images in the segment's content file.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pmmrec.errors import PmmrecError
from pmmrec.utils.io import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "pmmrec-vector-store"
FORMAT_VERSION = 1
MANIFEST = "store.json"
LOCK = ".lock"
DIGEST_BYTES = 16  # per-item content digests (blake2b-128, as the feature cache's)
MAX_SEGMENTS = 16  # an append past this many merges the segments after the first (the base stays untouched)
AUX_PREFIX = "aux."  # files other modules keep in a store's folder (start-up caches): never read as the store
_PARTS = {"vectors": ".vectors.npy", "ids": ".ids.txt", "digests": ".digests.npy"}
CONTENT = "items"  # the optional part: titles and images of items added at run time
_CONTENT_SUFFIX = ".items.jsonl"
_SEGMENT_FILE = re.compile(r"^(\d{6,})\.(vectors\.npy|ids\.txt|digests\.npy|items\.jsonl)$")
Content = tuple[str | None, bytes | None]  # an added item's (title, encoded image)


class StoreError(PmmrecError):
    """A vector store that cannot be used: missing, truncated, corrupted, of another format or another model."""


@dataclass(frozen=True)
class StoreKey:
    """What the vectors of a store were computed under; a store is reused only under an equal key.

    ``weights``: a digest of every tensor of the item encoder (trainable ones included); ``dim``: the vector size;
    ``model``: the item tower's settings (tower, modality, fusion); ``inputs``: the preprocessing of titles and
    images (tokenizer files, ``max_tokens``, lower-casing, image preprocessor...). Each item's own content (title
    bytes, image bytes) is its digest, stored per row.
    """

    weights: str
    dim: int
    model: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "dim": self.dim, "model": self.model, "inputs": self.inputs}

    @classmethod
    def from_dict(cls, data: dict) -> StoreKey:
        return cls(str(data["weights"]), int(data["dim"]), dict(data.get("model", {})), dict(data.get("inputs", {})))

    def differences(self, other: StoreKey) -> list[str]:
        """What differs between this key (a store's) and ``other`` (the model's), in words: ``[]`` when equal."""
        out = []
        if self.dim != other.dim:
            out.append(f"vector dimension {self.dim} in the store, {other.dim} for the model")
        if self.weights != other.weights:
            out.append(f"item-encoder weights digest {self.weights[:16]} in the store, {other.weights[:16]} for "
                       "the model")
        for section in ("model", "inputs"):
            mine, theirs = getattr(self, section), getattr(other, section)
            for name in sorted(set(mine) | set(theirs)):
                if mine.get(name) != theirs.get(name):
                    out.append(f"{section}.{name} {_short(mine.get(name))} in the store, {_short(theirs.get(name))} "
                               "for the model")
        return out


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class StoredVectors:
    """A verified store: ``vectors[i]`` is the vector of ``ids[i]``, computed from content ``digests[i]``."""

    key: StoreKey
    version: int
    ids: list[str]
    digests: np.ndarray  # (N, DIGEST_BYTES) uint8
    vectors: np.ndarray  # (N, D) float32; one segment: a read-only memory map of its file, several: a copy
    segments: list[dict]  # the manifest's segment entries, in order


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


class VectorStore:
    """A catalogue vector store in the folder ``path`` (which need not exist yet). See the module docstring."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"VectorStore({str(self.path)!r})"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    # ------------------------------------------------------------------------------------------------- reading
    def manifest(self) -> dict:
        """The parsed manifest, checked for shape (not the files it names); StoreError if absent or malformed."""
        where = self.manifest_path
        try:
            data = json.loads(where.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no vector store here (no {MANIFEST})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{where}: unreadable manifest ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StoreError(f"{where}: not a pmmrec vector store manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{where}: store format version {data.get('format_version')!r}; this pmmrec reads "
                             f"version {FORMAT_VERSION}")
        try:
            StoreKey.from_dict(data["key"])
            segments = data["segments"]
            rows = sum(int(s["rows"]) for s in segments)
            for s in segments:
                for part in (*_PARTS, *([CONTENT] if CONTENT in s["files"] else [])):
                    entry = s["files"][part]
                    str(entry["name"]), int(entry["bytes"]), str(entry["sha256"])
            if rows != int(data["count"]) or int(data["dim"]) != int(data["key"]["dim"]) or int(data["version"]) < 1:
                raise ValueError("counts do not add up")
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: malformed manifest ({e})") from None
        return data

    def key(self) -> StoreKey:
        """The key of the vectors stored (reads the manifest only)."""
        return StoreKey.from_dict(self.manifest()["key"])

    def read(self, verify: bool = True) -> StoredVectors:
        """Every stored item, its digest and its vector, after checking each file's size and SHA-256.

        ``verify=False`` checks sizes and headers only (for a caller that has just checked the checksums).
        Raises :class:`StoreError` naming the first file that is missing, truncated or corrupted.
        """
        data = self.manifest()
        key = StoreKey.from_dict(data["key"])
        parts = self._segments(data, verify)
        ids = [i for seg_ids, _, _ in parts for i in seg_ids]
        if len(set(ids)) != len(ids):
            raise StoreError(f"{self.manifest_path}: an item id appears twice in the store")
        digests = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, DIGEST_BYTES), dtype=np.uint8)
        if len(parts) == 1:
            vectors = parts[0][2]
        else:
            vectors = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, key.dim), dtype=np.float32)
        return StoredVectors(key, int(data["version"]), ids, digests, vectors, list(data["segments"]))

    def stamp(self) -> tuple[int, ...] | None:
        """What changes whenever the manifest is replaced (inode, size, times), or None without one: cheap to poll
        before reading the manifest itself."""
        try:
            st = self.manifest_path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def read_segments(self, data: dict, segments: Sequence[dict], verify: bool = True) -> list[
            tuple[list[str], np.ndarray, np.ndarray]]:
        """``(ids, digests, vectors)`` of each of ``segments`` (entries of the manifest ``data``), files checked;
        the vectors are read-only memory maps of their files."""
        return self._segments({**data, "segments": list(segments)}, verify)

    def read_content(self, segment: dict, verify: bool = True) -> dict[str, Content]:
        """The titles and images of the items a segment's content file holds, by id ({} without one)."""
        entry = segment["files"].get(CONTENT)
        if entry is None:
            return {}
        path = self._checked_file(entry, verify)
        out: dict[str, Content] = {}
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                image = row.get("image")
                out[str(row["id"])] = (row.get("title"), base64.b64decode(image) if image is not None else None)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path}: unreadable item content ({e})") from None
        return out

    def _segments(self, data: dict, verify: bool) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
        """Each segment's (ids, digests, vectors memory-mapped), files checked."""
        dim = int(data["key"]["dim"])
        out = []
        for segment in data["segments"]:
            rows = int(segment["rows"])
            files = {part: self._checked_file(segment["files"][part], verify) for part in _PARTS}
            out.append((self._read_ids(files["ids"], rows),
                        self._read_array(files["digests"], (rows, DIGEST_BYTES), np.uint8, mmap=False),
                        self._read_array(files["vectors"], (rows, dim), np.float32, mmap=True)))
        return out

    def _checked_file(self, entry: dict, verify: bool) -> Path:
        name = str(entry["name"])
        if not _SEGMENT_FILE.match(name):
            raise StoreError(f"{self.manifest_path}: bad file name {name!r}")
        path = self.path / name
        try:
            size = path.stat().st_size
        except OSError:
            raise StoreError(f"{path}: missing (the store's manifest names it)") from None
        if size != int(entry["bytes"]):
            raise StoreError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)")
        if verify and file_sha256(path) != entry["sha256"]:
            raise StoreError(f"{path}: checksum mismatch (SHA-256 differs from the manifest's: corrupted)")
        return path

    @staticmethod
    def _read_ids(path: Path, rows: int) -> list[str]:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise StoreError(f"{path}: unreadable ({e})") from None
        ids = text.split("\n")
        if ids and ids[-1] == "":
            ids.pop()
        if len(ids) != rows:
            raise StoreError(f"{path}: {len(ids)} ids, the manifest says {rows}")
        return ids

    @staticmethod
    def _read_array(path: Path, shape: tuple[int, int], dtype, mmap: bool) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise StoreError(f"{path}: unreadable array ({e})") from None
        if array.shape != shape or array.dtype != np.dtype(dtype):
            raise StoreError(f"{path}: {array.dtype} {array.shape}, expected {np.dtype(dtype)} {shape}")
        return array

    # ------------------------------------------------------------------------------------------------- writing
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock of the store for a read-modify-write (``flock`` on ``.lock``; released on exit)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def write(self, key: StoreKey, ids: Sequence[str], digests: np.ndarray, vectors: np.ndarray,
              info: dict | None = None) -> int:
        """Replace the store's content with these items (one segment); returns the new version.

        The caller holds :meth:`lock` when other writers may exist. ``info`` (JSON) is kept in the manifest for
        people (which checkpoint and catalogue), never compared.
        """
        self._check_new(key, ids, digests, vectors)
        self.check_writable()
        try:
            old = self.manifest()
        except StoreError:
            old = None
        version = (int(old["version"]) if old is not None else 0) + 1
        segment = self._write_segment(self._next_number(old), ids, digests, vectors)
        self._commit(key, version, [segment], info if info is not None else (old or {}).get("info", {}))
        self._remove_unreferenced(_file_names([segment]))
        return version

    def append(self, key: StoreKey, ids: Sequence[str], digests: np.ndarray, vectors: np.ndarray,
               content: Sequence[Content] | None = None) -> int:
        """Add items (ids not in the store yet) as a new segment; returns the new version.

        ``content``: each item's (title, encoded image), kept in the segment's content file so that other
        processes serving the store can show the items (items added at run time). The store must exist, be intact
        (sizes checked) and have ``key``; otherwise :class:`StoreError` and nothing changes. Past
        :data:`MAX_SEGMENTS` segments, those after the first are merged into one (content files too).
        """
        self._check_new(key, ids, digests, vectors)
        if content is not None and len(content) != len(ids):
            raise ValueError(f"content must have one entry per item ({len(ids)}), got {len(content)}")
        lines = None if content is None else [_content_line(i, c) for i, c in zip(ids, content, strict=True)]
        old = self.manifest()
        if StoreKey.from_dict(old["key"]) != key:
            raise StoreError(f"{self.path}: the store holds another model's vectors; not appending to it")
        parts = self._segments(old, verify=False)
        taken = {i for seg_ids, _, _ in parts for i in seg_ids}.intersection(ids)
        if taken:
            raise StoreError(f"{self.path}: item id(s) already in the store: {', '.join(sorted(taken)[:5])}")
        segments = list(old["segments"])
        number = self._next_number(old)
        merged = len(segments) + 1 > MAX_SEGMENTS
        if merged:  # the tail segments and the new items become one segment; the base (often large) stays
            tail = parts[1:]
            kept = [line for s in segments[1:] for line in self._content_lines(s)]
            segments = [segments[0], self._write_segment(
                number, [i for seg_ids, _, _ in tail for i in seg_ids] + list(ids),
                np.concatenate([p[1] for p in tail] + [digests]),
                np.concatenate([np.asarray(p[2]) for p in tail] + [vectors]),
                kept + (lines or []) if kept or lines else None)]
        else:
            segments.append(self._write_segment(number, ids, digests, vectors, lines))
        version = int(old["version"]) + 1
        self._commit(key, version, segments, old.get("info", {}))
        if merged:
            self._remove_unreferenced(_file_names(segments))
        return version

    def _content_lines(self, segment: dict) -> list[str]:
        entry = segment["files"].get(CONTENT)
        if entry is None:
            return []
        path = self._checked_file(entry, verify=False)
        return path.read_text(encoding="utf-8").splitlines()

    def _check_new(self, key: StoreKey, ids: Sequence[str], digests: np.ndarray, vectors: np.ndarray) -> None:
        n = len(ids)
        if vectors.shape != (n, key.dim):
            raise ValueError(f"vectors must be ({n}, {key.dim}), got {vectors.shape}")
        if digests.shape != (n, DIGEST_BYTES):
            raise ValueError(f"digests must be ({n}, {DIGEST_BYTES}), got {digests.shape}")
        bad = [i for i in ids if not isinstance(i, str) or not i or "\n" in i or "\r" in i]
        if bad:
            raise StoreError(f"item id {bad[0]!r} cannot be stored (empty, or holds a line break)")
        if len(set(ids)) != n:
            raise StoreError("an item id is given twice")

    def check_writable(self) -> None:
        """Refuse to write into a folder that holds something other than a store (never clobber user files)."""
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise StoreError(f"{self.path} is a file; a vector store is a folder")
        foreign = [p.name for p in self.path.iterdir()
                   if p.name not in (MANIFEST, LOCK) and not _SEGMENT_FILE.match(p.name)
                   and not p.name.startswith(AUX_PREFIX)
                   and not (p.name.startswith(".") and p.name.endswith(".tmp"))]
        if foreign:
            raise StoreError(f"{self.path} holds files that are not a vector store's ({', '.join(sorted(foreign)[:3])}"
                             "); give an empty or new folder")

    def _next_number(self, manifest: dict | None) -> int:
        """One more than any segment number named by the manifest or present in the folder (never reused)."""
        used = [0]
        if manifest is not None:
            used += [int(s["name"]) for s in manifest["segments"]]
        if self.path.is_dir():
            used += [int(m.group(1)) for p in self.path.iterdir() if (m := _SEGMENT_FILE.match(p.name))]
        return max(used) + 1

    def _write_segment(self, number: int, ids: Sequence[str], digests: np.ndarray, vectors: np.ndarray,
                       content_lines: Sequence[str] | None = None) -> dict:
        name = f"{number:06d}"
        self.path.mkdir(parents=True, exist_ok=True)
        files = {}
        contents = {"vectors": np.ascontiguousarray(vectors, dtype=np.float32),
                    "digests": np.ascontiguousarray(digests, dtype=np.uint8)}
        parts = dict(_PARTS, **({CONTENT: _CONTENT_SUFFIX} if content_lines is not None else {}))
        for part, suffix in parts.items():
            path = self.path / f"{name}{suffix}"
            with atomic_file(path, "wb") as f:
                if part == "ids":
                    f.write("".join(f"{i}\n" for i in ids).encode("utf-8"))
                elif part == CONTENT:
                    f.write("".join(f"{line}\n" for line in content_lines).encode("utf-8"))
                else:
                    np.save(f, contents[part], allow_pickle=False)
            files[part] = {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        return {"name": name, "rows": len(ids), "files": files}

    def _commit(self, key: StoreKey, version: int, segments: list[dict], info: dict) -> None:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "version": version,
                    "count": sum(int(s["rows"]) for s in segments), "dim": key.dim, "key": key.to_dict(),
                    "segments": segments, "info": info}
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

    def _remove_unreferenced(self, keep: set[str]) -> None:
        """Delete segment files no manifest names any more, and temporaries of crashed writes."""
        for path in self.path.iterdir():
            stale = _SEGMENT_FILE.match(path.name) and path.name not in keep
            if stale or (path.name.startswith(".") and path.name.endswith(".tmp")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _file_names(segments: Sequence[dict]) -> set[str]:
    return {entry["name"] for s in segments for entry in s["files"].values()}


def _content_line(item_id: str, content: Content) -> str:
    title, image = content
    return json.dumps({"id": item_id, "title": title,
                       "image": base64.b64encode(image).decode("ascii") if image is not None else None},
                      ensure_ascii=False)
