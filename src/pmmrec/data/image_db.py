"""The image database: an LMDB of encoded image files keyed by item id (docs/design.md §3).

Values are the original encoded bytes (JPEG/PNG/WebP), never pickled objects: unpickling untrusted data executes
code. Readers open one read-only handle per process (and so per DataLoader worker) lazily, on first use.

``build_image_db`` is ``pmmrec data build-images`` (the reference code's missing ``lmdb_build.py``): it walks a
folder, maps each file's stem to an item id, checks in parallel worker processes that every image decodes, and
writes the good ones from the parent process into one LMDB built under a temporary name and renamed at the end.
Bad files are listed in the :class:`BuildReport` with the reason, never silently dropped.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
from PIL import Image
from tqdm import tqdm

from pmmrec.data.images import MAX_PIXELS, decode_image, open_image
from pmmrec.errors import DataError, PmmrecError
from pmmrec.utils.io import atomic_dir, atomic_write_text

log = logging.getLogger(__name__)

MAP_SIZE = 1 << 40  # LMDB reserves address space, not disk: 1 TiB is the usual "large enough"
MAX_KEY_BYTES = 511  # LMDB's default maximum key size
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
JPEG_QUALITY = 90  # for images re-encoded by --resize


def write_image_db(out: str | os.PathLike, images: Iterable[tuple[str, bytes]], overwrite: bool = False,
                   commit_every: int = 1000, commit_bytes: int = 256 << 20) -> int:
    """Write ``(item_id, encoded bytes)`` pairs into a new LMDB at ``out``, atomically. Returns the count.

    An exception raised while ``images`` is iterated leaves nothing behind (and an existing ``out`` untouched).
    A transaction is committed every ``commit_every`` images or ``commit_bytes`` bytes, whichever comes first,
    so large images do not pile up in one transaction's dirty pages.
    """
    count = pending = 0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        env = lmdb.open(str(tmp), map_size=MAP_SIZE, subdir=True, lock=True)
        try:
            txn = env.begin(write=True)
            for item_id, data in images:
                txn.put(item_id.encode("utf-8"), data)
                count += 1
                pending += len(data)
                if count % commit_every == 0 or pending >= commit_bytes:
                    txn.commit()
                    txn = env.begin(write=True)
                    pending = 0
            txn.commit()
            env.sync()
        finally:
            env.close()
    return count


# One read-only LMDB environment per database per process, shared by every ImageDB on that path: py-lmdb refuses
# to open the same files twice in one process (LMDB's locks are per process). Entries are keyed by the resolved
# path and the data file's identity (a database rebuilt at the same path is a new one) and hold (owning pid,
# environment, number of ImageDB users).
_SHARED: dict[tuple[str, int, int], tuple[int, lmdb.Environment, int]] = {}
_SHARED_LOCK: tuple[int, threading.Lock] = (os.getpid(), threading.Lock())


def _shared_lock() -> threading.Lock:
    # A lock inherited through fork may be held by a thread that does not exist in the child: make a new one.
    global _SHARED_LOCK
    if _SHARED_LOCK[0] != os.getpid():
        _SHARED_LOCK = (os.getpid(), threading.Lock())
    return _SHARED_LOCK[1]


def _env_key(path: Path) -> tuple[str, int, int]:
    real = os.path.realpath(path)
    stat = os.stat(os.path.join(real, "data.mdb"))
    return real, stat.st_dev, stat.st_ino


def _acquire_env(key: tuple[str, int, int]) -> lmdb.Environment:
    pid = os.getpid()
    with _shared_lock():
        entry = _SHARED.get(key)
        if entry is not None and entry[0] != pid:
            # Inherited through fork: an LMDB handle must not be used across a fork. Closing this process's copy of
            # a read-only, lock-free environment only unmaps it here; the parent's handle is unaffected.
            entry[1].close()
            entry = None
        if entry is None:
            env = lmdb.open(key[0], readonly=True, lock=False, readahead=False, subdir=True, max_readers=2048)
            entry = (pid, env, 0)
        _SHARED[key] = (pid, entry[1], entry[2] + 1)
        return entry[1]


def _release_env(key: tuple[str, int, int]) -> None:
    with _shared_lock():
        entry = _SHARED.get(key)
        if entry is None or entry[0] != os.getpid():
            return
        if entry[2] <= 1:
            del _SHARED[key]
            entry[1].close()
        else:
            _SHARED[key] = (entry[0], entry[1], entry[2] - 1)


class ImageDB:
    """Read-only access to an image LMDB. The handle is opened lazily and re-opened after a fork.

    ImageDB objects on the same database in one process share one LMDB environment; the last ``close`` closes it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "data.mdb").is_file():
            raise DataError("not an image database (no data.mdb inside)", self.path)
        self._env: lmdb.Environment | None = None
        self._pid: int | None = None
        self._key: tuple[str, int, int] | None = None

    def _handle(self) -> lmdb.Environment:
        # An LMDB environment must not cross a fork: each worker process opens its own.
        if self._env is None or self._pid != os.getpid():
            self._key = _env_key(self.path)
            self._env = _acquire_env(self._key)
            self._pid = os.getpid()
        return self._env

    def get(self, item_id: str) -> bytes | None:
        with self._handle().begin(buffers=False) as txn:
            return txn.get(item_id.encode("utf-8"))

    def __contains__(self, item_id: str) -> bool:
        return self.get(item_id) is not None

    def keys(self) -> set[str]:
        with self._handle().begin() as txn:
            return {bytes(k).decode("utf-8") for k in txn.cursor().iternext(keys=True, values=False)}

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return self._handle().stat()["entries"]

    def close(self) -> None:
        if self._env is not None and self._pid == os.getpid():
            _release_env(self._key)
        self._env = self._pid = self._key = None

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: the handle is not sent
        return {"path": self.path, "_env": None, "_pid": None, "_key": None}


def image_keys(path: str | os.PathLike) -> set[str]:
    """All item ids that have an image in the database at ``path``."""
    db = ImageDB(path)
    try:
        return db.keys()
    finally:
        db.close()


@dataclass
class BuildReport:
    """What ``build_image_db`` did: what it stored, and every file it did not store and why."""

    image_dir: str
    out: str
    stored: int = 0
    resized: int = 0  # stored images that --resize re-encoded (the others kept their original bytes)
    bytes_stored: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): unreadable or corrupt
    duplicates: list[tuple[str, list[str]]] = field(default_factory=list)  # (item id, paths): none stored
    unused: list[str] = field(default_factory=list)  # image files whose id is not a known item
    ignored: int = 0  # files skipped without a look: hidden, or not an image by their extension
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dictionary (the CLI prints or saves it)."""
        return {
            "image_dir": self.image_dir, "out": self.out, "stored": self.stored, "resized": self.resized,
            "bytes_stored": self.bytes_stored,
            "bad": [{"path": p, "reason": r} for p, r in self.bad],
            "duplicates": [{"item_id": i, "paths": ps} for i, ps in self.duplicates],
            "unused": self.unused, "ignored": self.ignored, "seconds": round(self.seconds, 3),
        }

    def write_report(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    def summary(self) -> str:
        """One line for the log: counts only."""
        return (f"stored {self.stored} images ({self.bytes_stored / 1e6:.1f} MB, {self.resized} resized) in "
                f"{self.out} in {self.seconds:.1f} s; {len(self.bad)} bad, {len(self.duplicates)} duplicated ids, "
                f"{len(self.unused)} unused, {self.ignored} other files ignored")


def build_image_db(image_dir: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False,
                   workers: int | None = None, resize: int | None = None,
                   id_map: Callable[[str], str | None] | None = None, allowed_ids: set[str] | None = None,
                   progress: bool = True, max_pixels: int = MAX_PIXELS) -> BuildReport:
    """Build the image LMDB ``out`` from the image files under ``image_dir`` (``pmmrec data build-images``).

    Every ``.jpg/.jpeg/.png/.webp/.gif/.bmp`` file (any case, any depth; hidden files and folders skipped) is
    stored under the item id ``id_map(stem)`` (default: the stem itself); ids that map to ``None`` or are not
    in ``allowed_ids`` are reported as unused. Each file must open and fully decode, within ``max_pixels``;
    two files with the same id are both reported as duplicates and neither is stored. The original bytes are
    stored, or with ``resize`` images whose longer side exceeds ``resize`` pixels are shrunk to it and
    re-encoded (JPEG stays JPEG, anything else becomes PNG).

    Raises :class:`PmmrecError` when the folder is missing or holds no usable image, or when ``out`` exists and
    ``overwrite`` is not set; nothing is written then, and a failure part-way leaves no output behind.
    """
    start = time.perf_counter()
    root = Path(image_dir)
    if not root.is_dir():
        raise PmmrecError(f"{root}: image folder not found" if not root.exists() else f"{root}: not a folder")
    if resize is not None and (not isinstance(resize, int) or resize < 1):
        raise PmmrecError(f"--resize must be a positive number of pixels, got {resize!r}")
    workers = _default_workers() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise PmmrecError(f"--workers must be at least 1, got {workers!r}")

    files, ignored = _scan(root)
    report = BuildReport(image_dir=_shown(root), out=_shown(Path(out)), ignored=ignored)
    if not files:
        raise PmmrecError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found"
                          + (f"; {ignored} other files ignored" if ignored else ""))

    by_id: dict[str, list[Path]] = {}
    for path in files:
        item_id = id_map(path.stem) if id_map is not None else path.stem
        if item_id is None or (allowed_ids is not None and item_id not in allowed_ids):
            report.unused.append(_shown(path))
            continue
        problem = _key_problem(item_id)
        if problem:
            report.bad.append((_shown(path), problem))
            continue
        by_id.setdefault(item_id, []).append(path)
    report.duplicates = [(item_id, [_shown(p) for p in paths]) for item_id, paths in by_id.items()
                         if len(paths) > 1]
    tasks = [(item_id, paths[0]) for item_id, paths in by_id.items() if len(paths) == 1]
    if not tasks:
        raise PmmrecError(f"{root}: none of the {len(files)} image files can be stored "
                          f"({len(report.unused)} unused ids, {len(report.duplicates)} duplicated ids, "
                          f"{len(report.bad)} bad names)")

    def good_images(checked: Iterable[tuple[bytes | None, str | None, bool]]) -> Iterator[tuple[str, bytes]]:
        with tqdm(total=len(tasks), unit="img", desc="images", disable=not progress, leave=False) as bar:
            for (item_id, path), (data, reason, resized) in zip(tasks, checked, strict=True):
                bar.update(1)
                if data is None:
                    report.bad.append((_shown(path), reason))
                    continue
                report.stored += 1
                report.resized += int(resized)
                report.bytes_stored += len(data)
                yield item_id, data
        if report.stored == 0:
            # Raised inside the write, so the temporary database is removed and nothing is left at ``out``.
            example_path, example_reason = report.bad[-1]
            raise PmmrecError(f"{root}: none of the {len(tasks)} images decodes "
                              f"(e.g. {example_path}: {example_reason})")

    if Path(out).exists() and not overwrite:  # before any work (write_image_db checks again, atomically)
        raise PmmrecError(f"{out} already exists; pass --overwrite to replace it")
    with _Checker([path for _, path in tasks], workers, resize, max_pixels) as checker:
        write_image_db(out, good_images(checker), overwrite=overwrite)
    report.seconds = time.perf_counter() - start
    log.info("%s", report.summary())
    for path, reason in report.bad[:5]:
        log.warning("bad image %s: %s", path, reason)
    if len(report.bad) > 5:
        log.warning("... and %d more bad images (build-images --report FILE lists them all)", len(report.bad) - 5)
    for item_id, paths in report.duplicates[:5]:
        log.warning("item %r has several images, none stored: %s", item_id, ", ".join(paths))
    return report


def _default_workers() -> int:
    # The CPUs this process may run on (a container's limit), not the machine's count.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _scan(root: Path) -> tuple[list[Path], int]:
    """Image files under ``root`` in a stable (sorted) order, and the number of other files skipped."""
    files, ignored = [], 0
    for folder, dirs, names in os.walk(root):
        # Hidden folders (.git, .thumbnails) and files (macOS "._x.jpg" resource forks) are not images.
        ignored += sum(1 for d in dirs if d.startswith("."))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(Path(folder) / name)
            else:
                ignored += 1
    return files, ignored


def _key_problem(item_id: str) -> str | None:
    if not item_id:
        return "empty item id"
    try:
        size = len(item_id.encode("utf-8"))
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if size > MAX_KEY_BYTES:
        return f"item id is {size} bytes long; LMDB keys hold at most {MAX_KEY_BYTES}"
    return None


def _shown(path: Path) -> str:
    # Undecodable bytes in file names (surrogate escapes) would break the UTF-8 report: show them escaped.
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def check_image_file(path: str, resize: int | None = None,
                     max_pixels: int = MAX_PIXELS) -> tuple[bytes | None, str | None, bool]:
    """Read and validate one image file: ``(bytes to store, None, resized)`` or ``(None, reason, False)``."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read the file ({e.strerror or e})", False
    if not data:
        return None, "empty file (0 bytes)", False
    try:
        image = open_image(data, max_pixels)
        image_format = image.format
        try:
            # verify() checks structure that decoding skips (e.g. PNG chunk checksums); load() in decode_image
            # below catches truncated and corrupt pixel data.
            image.verify()
        except Exception as e:  # Pillow's plugins raise many types here; any of them means a broken file
            raise DataError(f"image structure is corrupt ({str(e).strip() or type(e).__name__})") from None
        image = decode_image(data, max_pixels)
    except DataError as e:
        return None, str(e), False
    if resize is None or max(image.size) <= resize:
        return data, None, False
    # reducing_gap: a cheap box reduction first, then bicubic for the last factor of 3 (fast, still sharp)
    image.thumbnail((resize, resize), resample=Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    if image_format in ("JPEG", "MPO"):
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue(), None, True


def _check_chunk(paths: list[str], resize: int | None, max_pixels: int) -> list[tuple[bytes | None, str | None,
                                                                                      bool]]:
    return [check_image_file(p, resize, max_pixels) for p in paths]


class _Checker:
    """``check_image_file`` over many paths in worker processes; iterating yields the results in order.

    The workers are forked when the context is entered, before the caller opens the output LMDB, so no child
    inherits a live write transaction.
    """

    def __init__(self, paths: list[Path], workers: int, resize: int | None, max_pixels: int):
        self.names = [str(p) for p in paths]
        self.workers, self.resize, self.max_pixels = workers, resize, max_pixels
        # Chunks amortise the inter-process round trip; a few chunks per worker in flight keep every worker busy
        # while bounding how many encoded images wait in memory for the parent to write them.
        self.chunk = max(1, min(32, math.ceil(len(self.names) / (workers * 8))))
        self.executor: ProcessPoolExecutor | None = None
        self.pending: deque = deque()
        self.upcoming: Iterator[list[str]] = iter(())

    def __enter__(self) -> _Checker:
        if self.workers > 1 and len(self.names) > 2 * self.chunk:  # else too little work to start processes for
            # fork (Linux) starts the workers at once and does not re-import the caller's __main__;
            # the workers only run Pillow.
            context = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else None
            self.executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
            self.upcoming = (self.names[i:i + self.chunk] for i in range(0, len(self.names), self.chunk))
            while len(self.pending) < 3 * self.workers and self._submit_next():
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def _submit_next(self) -> bool:
        part = next(self.upcoming, None)
        if part is None:
            return False
        self.pending.append(self.executor.submit(_check_chunk, part, self.resize, self.max_pixels))
        return True

    def __iter__(self) -> Iterator[tuple[bytes | None, str | None, bool]]:
        if self.executor is None:
            for name in self.names:
                yield check_image_file(name, self.resize, self.max_pixels)
            return
        while self.pending:
            done = self.pending.popleft()
            try:
                results = done.result()
            except BrokenProcessPool:
                raise PmmrecError("an image decoding worker process died (a crash inside the image library on a "
                                  "malformed file?); rerun with --workers 1 to find the file") from None
            self._submit_next()
            yield from results
