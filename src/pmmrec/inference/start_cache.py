"""What a restart would otherwise recompute from files that did not change, kept in the vector store's folder.

docs/design.md §8. Three facts cost most of a restart on a large catalogue and change rarely:

- **image digests**: each item's image digest (``data.item_features.image_digest``) reads and hashes every image
  of the domain's LMDB (about 1.5 s for 100,000 small images on a busy CPU);
- **weights digest**: the item encoder's :func:`~pmmrec.runtime.feature_files.tensors_fingerprint`, which hashes
  every tensor of the loaded encoders;
- **the catalogue record**: that the store holds the whole catalogue, row for row, under the checkpoint's key.
  It lets a restart skip the digests and the item encoder altogether (:mod:`pmmrec.inference.start`).

Each is recorded with the *identity* of the files it was computed from: for every file, its resolved path, device,
inode, size, modification time and change time (nanoseconds), taken before the file was read. A later start that
finds every file with the same identity takes the recorded value; any difference (or a cache that is missing,
unreadable, of another format, or whose array fails its SHA-256) means computing it again from the files, as
without a cache. The identity is safe to trust because a file cannot change without it changing: writing a file
sets its modification and change times, and the change time cannot be set back from user space (``touch -d``,
``cp -p`` or ``rsync -t`` set the modification time, and thereby the change time to now); replacing a file (an
atomic rename, as the training loop and ``pmmrec data`` write) gives it a new inode. One gap remains: two writes
within one tick of the filesystem's clock, the first before the identity was taken and the second after, leave the
same identity (git's "racy" problem). So nothing is recorded for a file changed less than :data:`RACY_S` seconds
before its value was computed; the next start computes it again and records it then. An identity is also taken
again after computing, and nothing is recorded if it moved (a write during the computation).

What is keyed besides the files: the image digests by the list of (database, key) of every item and the
``missing_image`` policy; the weights digest and the catalogue record by the checkpoint, the config overrides and
the pmmrec version (a checkpoint fixes the whole encoder: its tensors are loaded from it, and the frozen pretrained
tensors it leaves out are checked against the SHA-256 it records of them when the model is built,
``PMMRec.load_state_dict``); the catalogue record also by the store manifest's SHA-256 and version.

The files: ``aux.start-cache.json`` (the records) and ``aux.image-digests.npy`` (the digests of the one catalogue
the record describes), each written atomically; writing them is best effort (a read-only folder only costs the
next start the same work again). The store's own checks are unchanged: every read of the store verifies each
file's size and SHA-256 (0.1 s for 100,000 vectors of dimension 256), so a damaged store is never served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmmrec import __version__
from pmmrec.config import Config
from pmmrec.data.domain import find_domain_files
from pmmrec.data.item_features import ImageRef
from pmmrec.inference.vector_store import (
    AUX_PREFIX,
    DIGEST_BYTES,
    StoreError,
    StoreKey,
    VectorStore,
    file_sha256,
)
from pmmrec.pretrained import VISION_BUILTINS
from pmmrec.utils.io import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

FORMAT = 1
CACHE = f"{AUX_PREFIX}start-cache.json"
IMAGE_DIGESTS = f"{AUX_PREFIX}image-digests.npy"
RACY_S = 2.0  # a file modified less than this before its value was computed is not recorded (see the docstring)
MAX_WEIGHTS = 8  # weights records kept (checkpoints x overrides served with this store)


def file_identity(path: str | os.PathLike) -> dict | None:
    """What identifies ``path``'s content without reading it (see the module docstring); None if it is missing."""
    try:
        resolved = Path(path).resolve()
        st = resolved.stat()
    except OSError:
        return None
    return {"path": str(resolved), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _identities(paths: Sequence[Path]) -> list[dict | None]:
    return [file_identity(p) for p in paths]


def _settled(identities: list[dict | None], began_ns: int) -> bool:
    """Whether every file exists and was last changed long enough before ``began_ns`` to be recorded."""
    limit = began_ns - int(RACY_S * 1e9)
    return all(i is not None and max(i["mtime_ns"], i["ctime_ns"]) < limit for i in identities)


def _lmdb_files(refs: Sequence[ImageRef]) -> list[Path]:
    """The data files of the image databases ``refs`` point into (an LMDB's content is its ``data.mdb``)."""
    return [Path(db) / "data.mdb" for db in sorted({str(db) for db, _ in refs if db is not None})]


def _unchanged(identity: dict | None) -> bool:
    """Whether the file of ``identity`` (taken earlier) still has it."""
    return identity is not None and file_identity(identity["path"]) == identity


def _refs_digest(refs: Sequence[ImageRef], missing_image: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{missing_image}\0".encode())
    for db, key in refs:
        h.update(f"{db}\0{key}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class StartCache:
    """The start-up records of the vector store ``store`` (read once, rewritten when something is recorded).

    Writing is best effort: a folder that cannot be written only costs the next start the same work again.
    """

    def __init__(self, store: VectorStore):
        self.store = store
        self.path = store.path / CACHE
        self._data = self._read()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            log.info("start-up cache %s unreadable (%s): computing everything again", self.path, e)
            return {}
        return data if isinstance(data, dict) and data.get("format") == FORMAT else {}

    def _record(self, section: str, value: object) -> None:
        """Set one section, keeping the others as they are on disk now (another process may have written one)."""
        self._data = {**self._read(), section: value, "format": FORMAT}
        try:
            self.store.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self._data, indent=1, sort_keys=True) + "\n")
        except OSError as e:
            log.debug("start-up cache %s not written (%s)", self.path, e)

    # ---------------------------------------------------------------------------------------------- images
    def image_digests(self, refs: Sequence[ImageRef], missing_image: str,
                      compute: Callable[[], np.ndarray]) -> np.ndarray:
        """(N+1, DIGEST_BYTES) image digests of ``refs`` (row 0 padding): recorded ones if every image database
        is unchanged since, else ``compute()`` (then recorded when the databases have settled)."""
        files = _lmdb_files(refs)
        key = _refs_digest(refs, missing_image)
        found = self._recorded_images(files, key, len(refs))
        if found is not None:
            return found
        began, before = time.time_ns(), _identities(files)
        digests = compute()
        after = _identities(files)
        if before == after and _settled(before, began):
            self._record_images(digests, before, key)
        return digests

    def _recorded_images(self, files: list[Path], key: str, count: int) -> np.ndarray | None:
        entry = self._data.get("images")
        if not isinstance(entry, dict) or entry.get("refs") != key or entry.get("files") != _identities(files):
            return None
        path = self.store.path / IMAGE_DIGESTS
        try:
            if file_sha256(path) != entry.get("sha256"):
                return None
            digests = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if digests.shape != (count + 1, DIGEST_BYTES) or digests.dtype != np.uint8:
            return None
        return digests

    def _record_images(self, digests: np.ndarray, files: list[dict | None], key: str) -> None:
        path = self.store.path / IMAGE_DIGESTS
        try:
            self.store.path.mkdir(parents=True, exist_ok=True)
            with atomic_file(path, "wb") as f:
                np.save(f, np.ascontiguousarray(digests, dtype=np.uint8), allow_pickle=False)
            entry = {"refs": key, "files": files, "sha256": file_sha256(path)}
        except OSError as e:
            log.debug("start-up cache: image digests not written to %s (%s)", path, e)
            return
        self._record("images", entry)

    # --------------------------------------------------------------------------------------------- weights
    def weights_digest(self, checkpoint: dict | None, overrides: Sequence[str], compute: Callable[[], str]) -> str:
        """The item encoder's weights digest of a model loaded with ``overrides`` from the checkpoint file whose
        identity was ``checkpoint`` (:func:`file_identity`, taken *before* it was read): the recorded one if the
        file still has that identity, else ``compute()`` (then recorded when the file has settled)."""
        began = time.time_ns()
        unchanged = _unchanged(checkpoint)
        match = {"checkpoint": checkpoint, "overrides": list(overrides), "pmmrec": __version__}
        records = self._data.get("weights")
        records = records if isinstance(records, list) else []
        for record in records:
            if unchanged and isinstance(record, dict) and {k: record.get(k) for k in match} == match and \
                    isinstance(record.get("weights"), str):
                return record["weights"]
        weights = compute()
        if unchanged and _unchanged(checkpoint) and _settled([checkpoint], began):
            kept = [r for r in records if isinstance(r, dict) and isinstance(r.get("checkpoint"), dict)
                    and (r["checkpoint"].get("path"), r.get("overrides")) != (checkpoint["path"], match["overrides"])]
            self._record("weights", (kept + [{**match, "weights": weights}])[-MAX_WEIGHTS:])
        return weights

    # ------------------------------------------------------------------------------------------- catalogue
    def record_catalogue(self, checkpoint: dict | None, overrides: Sequence[str], sources: list[dict | None],
                         users: dict | None, began_ns: int, key: StoreKey) -> None:
        """Record that the store, as it is now, holds every item of the catalogue row for row under ``key``, for
        the model loaded with ``overrides`` from the checkpoint file of identity ``checkpoint`` (taken before it
        was read) and the catalogue files of identities ``sources`` (:func:`catalogue_sources`, taken at
        ``began_ns``, before they were read): what :meth:`recorded_catalogue` lets the next start rely on.
        ``users``: the identity of the ``users.tsv`` this start validated (it does not decide any vector)."""
        if not _unchanged(checkpoint) or not _settled([checkpoint, *sources], began_ns):
            return
        try:
            manifest = self.store.manifest()
            digest = hashlib.sha256(self.store.manifest_path.read_bytes()).hexdigest()
        except (OSError, StoreError):
            return
        self._record("catalogue", {"checkpoint": checkpoint, "overrides": list(overrides), "pmmrec": __version__,
                                   "sources": sources, "manifest": digest, "version": int(manifest["version"]),
                                   "key": key.to_dict(), "users": users if _settled([users], began_ns) else None})

    def record_users(self, users: dict | None, began_ns: int) -> None:
        """Record that the ``users.tsv`` of identity ``users`` (taken at ``began_ns``, before it was read) was
        validated against the recorded catalogue."""
        entry = self._read().get("catalogue")
        if isinstance(entry, dict) and _settled([users], began_ns):
            self._record("catalogue", {**entry, "users": users})

    def forget_catalogue(self) -> None:
        """Drop the catalogue record: the next start takes the full path (checks every item again)."""
        self._record("catalogue", None)

    def recorded_catalogue(self, checkpoint: dict | None, overrides: Sequence[str],
                           sources: Sequence[Path], manifest: bool = True) -> CatalogueRecord | None:
        """What the last start recorded of this catalogue (:meth:`record_catalogue`), if the checkpoint file
        (identity ``checkpoint``, taken before it was read), the overrides, pmmrec, the catalogue's files and the
        store's manifest are all unchanged since; else None. The caller checks that the store it reads has the
        recorded version (a writer may commit in between). ``manifest=False`` skips the manifest: for a caller
        that checks the store itself (a worker sharing it takes any store holding the catalogue's items under the
        recorded key, with the items other workers appended since)."""
        entry = self._data.get("catalogue")
        if not isinstance(entry, dict) or not _unchanged(checkpoint):
            return None
        match = {"checkpoint": checkpoint, "overrides": list(overrides), "pmmrec": __version__}
        if {k: entry.get(k) for k in match} != match or entry.get("sources") != _identities(list(sources)):
            return None
        try:
            if manifest and \
                    hashlib.sha256(self.store.manifest_path.read_bytes()).hexdigest() != entry.get("manifest"):
                return None
            return CatalogueRecord(StoreKey.from_dict(entry["key"]), int(entry["version"]), entry.get("users"))
        except (OSError, KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True)
class CatalogueRecord:
    key: StoreKey  # the key the store holds the whole catalogue under
    version: int  # the store's version then
    users: dict | None  # the identity of the users.tsv validated then (None: validate it)


def catalogue_sources(folder: str | os.PathLike, config: Config) -> list[Path]:
    """The files whose content fixes a domain's catalogue as a content model sees it: ``items.tsv`` (ids and
    titles), the image database, and a local vision encoder's preprocessing config. (A tokenizer's files are
    checked by their fingerprint, in the key; ``users.tsv`` decides no vector.)"""
    files = find_domain_files(folder)
    out = [files.items]
    if files.images is not None:
        out.append(files.images / "data.mdb")
    if config.model.uses_images and config.vision.encoder not in VISION_BUILTINS:
        out.append(Path(config.vision.encoder).expanduser() / "preprocessor_config.json")
    return out


def open_cache(store: VectorStore | None) -> StartCache | None:
    """The start-up cache of ``store`` (None without a store)."""
    return StartCache(store) if store is not None else None
