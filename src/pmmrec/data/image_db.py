"""The image database: an LMDB of encoded image files keyed by item id (DESIGN section 3).

Values are the original encoded bytes (JPEG/PNG/WebP), never pickled objects: unpickling untrusted data executes
code. Readers open one read-only handle per process (and so per DataLoader worker) lazily, on first use.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import lmdb

from pmmrec.errors import DataError
from pmmrec.utils.io import atomic_dir

MAP_SIZE = 1 << 40  # LMDB reserves address space, not disk: 1 TiB is the usual "large enough"


def write_image_db(out: str | os.PathLike, images: Iterable[tuple[str, bytes]], overwrite: bool = False,
                   commit_every: int = 1000) -> int:
    """Write ``(item_id, encoded bytes)`` pairs into a new LMDB at ``out``, atomically. Returns the count."""
    count = 0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        env = lmdb.open(str(tmp), map_size=MAP_SIZE, subdir=True, lock=True)
        try:
            txn = env.begin(write=True)
            for item_id, data in images:
                txn.put(item_id.encode("utf-8"), data)
                count += 1
                if count % commit_every == 0:
                    txn.commit()
                    txn = env.begin(write=True)
            txn.commit()
            env.sync()
        finally:
            env.close()
    return count


class ImageDB:
    """Read-only access to an image LMDB. The handle is opened lazily and re-opened after a fork."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise DataError("not an image database (no data.mdb inside)", self.path)
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None

    def _handle(self) -> lmdb.Environment:
        # An LMDB environment must not cross a fork: each worker process opens its own.
        if self._env is None or self._pid != os.getpid():
            self._env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False, subdir=True,
                                  max_readers=2048)
            self._pid = os.getpid()
        return self._env

    def get(self, item_id: str) -> bytes | None:
        with self._handle().begin(buffers=False) as txn:
            return txn.get(item_id.encode("utf-8"))

    def keys(self) -> set[str]:
        with self._handle().begin() as txn:
            return {bytes(k).decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)}

    def __len__(self) -> int:
        return self._handle().stat()["entries"]

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: the handle is not sent
        return {"path": self.path, "_env": None, "_pid": None}


def image_keys(path: str | os.PathLike) -> set[str]:
    """All item ids that have an image in the database at ``path``."""
    db = ImageDB(path)
    try:
        return db.keys()
    finally:
        db.close()
