"""``pmmrec data import-reference``: the PMMRec authors' released data as a pmmrec domain (docs/design.md §3).

The reference release (ICDE24/PMMRec, e.g. its ``bili_food`` example) is a folder holding

* ``<name>_items_texts.tsv``: ``item<TAB>title`` lines, no header, items named like ``v123``;
* ``<name>_users.tsv``: ``user<TAB>item item ...`` lines, chronological;
* ``<name>_items_images.lmdb``: an LMDB (a folder, or a single file) whose key for item ``v123`` is the ASCII
  text of ``int("v123".replace("v", ""))``, i.e. ``b"123"``, and whose value is a *pickled Python object*: an
  instance of the reference's small image holder (class name ``LMDB_Image``) with the attributes ``channels``,
  ``size`` (height, width), ``image`` (the raw ``uint8`` pixels as bytes, row-major, channels last) and ``id``.

The two tables are read by :mod:`pmmrec.data.domain` as they are. The images are the dangerous part: unpickling
untrusted data runs arbitrary code. :class:`RestrictedUnpickler` therefore resolves only the handful of globals
needed to rebuild an image (our harmless :class:`ReferenceImage` stand-in for the holder class, NumPy's array and
dtype reconstructors, and the two helpers older pickle protocols use for objects and bytes) and refuses
everything else before it is called. A refused value stops the import with an error naming the LMDB key; nothing
is written. Each image is re-encoded (PNG by default, lossless) into our LMDB of encoded image files keyed by
item id. Everything is built in a temporary folder that replaces ``out`` only when complete.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lmdb
import numpy as np
from PIL import Image
from tqdm import tqdm

from pmmrec.data.domain import (
    IMAGES_DB,
    ITEMS_FILE,
    USERS_FILE,
    find_domain_files,
    read_items,
    read_users,
    write_domain_tables,
)
from pmmrec.data.image_db import JPEG_QUALITY, write_image_db
from pmmrec.data.images import MAX_PIXELS
from pmmrec.errors import DataError, PmmrecError
from pmmrec.utils.io import atomic_dir

log = logging.getLogger(__name__)

REPORT_FILE = "import_report.json"
TEXTS_SUFFIX, USERS_SUFFIX, IMAGES_SUFFIX = "_items_texts.tsv", "_users.tsv", "_items_images.lmdb"
HOLDER_CLASS = "LMDB_Image"  # the reference's image holder; its defining module varies (often __main__)
MAX_EXAMPLES = 20  # bad images listed in the report


class RefusedPickle(PmmrecError):
    """A pickled value asked for a global outside the allow-list (it may be hostile)."""


class ReferenceImage:
    """Stand-in for the reference's image holder: plain attributes, no behaviour that runs on unpickling.

    Only :meth:`__setstate__` runs while unpickling, and it only stores a dictionary.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"image holder state is a {type(state).__name__}, expected a dict")
        self.__dict__.update({str(k): v for k, v in state.items()})

    def to_array(self) -> np.ndarray:
        """The pixels as a (H, W, C) uint8 array, after checking every attribute."""
        pixels, size, channels = (getattr(self, name, None) for name in ("image", "size", "channels"))
        if not isinstance(pixels, bytes | bytearray):
            raise ValueError(f"attribute 'image' is {type(pixels).__name__}, expected bytes")
        if (not isinstance(size, tuple | list) or len(size) != 2
                or not all(isinstance(s, int | np.integer) and s > 0 for s in size)):
            raise ValueError(f"attribute 'size' is {size!r}, expected (height, width)")
        if not isinstance(channels, int | np.integer) or channels not in (1, 3, 4):
            raise ValueError(f"attribute 'channels' is {channels!r}, expected 1, 3 or 4")
        height, width = int(size[0]), int(size[1])
        if height * width > MAX_PIXELS:
            raise ValueError(f"{width}x{height} pixels is over the limit of {MAX_PIXELS}")
        if len(pixels) != height * width * int(channels):
            raise ValueError(f"{len(pixels)} bytes of pixels for a {height}x{width}x{channels} image")
        return np.frombuffer(bytes(pixels), dtype=np.uint8).reshape(height, width, int(channels))


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # NumPy 2 moved numpy.core to numpy._core; pickles written by either name the one of their time.
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


def _object_reconstructor(cls: type, base: type, state: Any) -> Any:
    """``copyreg._reconstructor`` (pickle protocols 0 and 1) restricted to plain objects of allowed classes."""
    if base is not object or cls is not ReferenceImage:
        raise RefusedPickle(f"copyreg._reconstructor of {getattr(cls, '__name__', cls)!r}")
    return object.__new__(cls)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``, which protocols 0-2 use to store bytes; only the latin-1 form they write."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# Protocols 0-2 record Python 2 module names (copy_reg, __builtin__) for compatibility.
_ALLOWED = {**_numpy_globals(), ("copyreg", "_reconstructor"): _object_reconstructor,
            ("copy_reg", "_reconstructor"): _object_reconstructor, ("builtins", "object"): object,
            ("__builtin__", "object"): object, ("_codecs", "encode"): _latin1_bytes}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only what an image needs; any other global raises :class:`RefusedPickle` before it is called."""

    def find_class(self, module: str, name: str) -> Any:
        if name == HOLDER_CLASS:
            return ReferenceImage
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise RefusedPickle(f"refusing to unpickle {module}.{name}: only image arrays are allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refusing a pickle with persistent ids")


def unpickle_image(data: bytes) -> np.ndarray:
    """A reference LMDB value -> (H, W, C) uint8 array. :class:`RefusedPickle` for a disallowed global,
    ``ValueError`` for anything else that is not an image."""
    try:
        value = RestrictedUnpickler(io.BytesIO(data)).load()
    except RefusedPickle:
        raise
    except Exception as e:  # a corrupt pickle raises many types (UnpicklingError, EOFError, TypeError, ...)
        raise ValueError(f"not a readable pickle ({type(e).__name__}: {e})") from None
    if isinstance(value, ReferenceImage):
        return value.to_array()
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim not in (2, 3) or (value.ndim == 3 and value.shape[2] not in (1, 3, 4)):
            raise ValueError(f"array of {value.dtype} and shape {value.shape}, expected uint8 (H, W[, C])")
        if value.shape[0] * value.shape[1] > MAX_PIXELS:
            raise ValueError(f"{value.shape[1]}x{value.shape[0]} pixels is over the limit of {MAX_PIXELS}")
        return value if value.ndim == 3 else value[:, :, None]
    raise ValueError(f"unpickled a {type(value).__name__}, expected an image holder or a uint8 array")


def encode_array(pixels: np.ndarray, image_format: Literal["png", "jpeg"] = "png") -> bytes:
    """(H, W, C) uint8 -> encoded image bytes (the reference reads its arrays as RGB, so do we)."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
    image = Image.fromarray(np.ascontiguousarray(pixels[:, :, 0] if mode == "L" else pixels), mode=mode)
    buf = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB" if mode == "RGBA" else mode).save(buf, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buf, format="PNG")
    return buf.getvalue()


def reference_key(item_id: str) -> str:
    """The reference LMDB key of an item: ``v123`` -> ``123`` (every ``v`` removed, then read as an integer).

    Ids that do not fit that rule (the reference code would crash on them) are looked up as they are.
    """
    try:
        return str(int(item_id.replace("v", "")))
    except ValueError:
        return item_id


@dataclass
class ReferenceFiles:
    name: str
    texts: Path
    users: Path
    images: Path | None


def find_reference_files(folder: str | os.PathLike, name: str | None = None) -> ReferenceFiles:
    """The reference files of ``folder``: ``<name>_items_texts.tsv``, ``<name>_users.tsv`` and (optional)
    ``<name>_items_images.lmdb``. Without ``name`` the folder must hold exactly one such pair."""
    folder = Path(folder)
    if name is None:
        files = find_domain_files(folder)
        if not files.items.name.endswith(TEXTS_SUFFIX):
            raise PmmrecError(f"{folder} is already a pmmrec domain ({ITEMS_FILE}, {USERS_FILE}); "
                              "use it directly, there is nothing to import")
        name = files.items.name[: -len(TEXTS_SUFFIX)]
    elif not folder.is_dir():
        raise DataError("folder not found", folder)
    texts, users, images = (folder / f"{name}{s}" for s in (TEXTS_SUFFIX, USERS_SUFFIX, IMAGES_SUFFIX))
    for path in (texts, users):
        if not path.is_file():
            raise DataError(f"file not found (expected the reference files {name}{TEXTS_SUFFIX} and "
                            f"{name}{USERS_SUFFIX})", path)
    return ReferenceFiles(name, texts, users, images if images.exists() else None)


@dataclass
class ReferenceImportReport:
    """What ``import_reference`` read and wrote. Saved as ``import_report.json`` in the domain folder."""

    source: str
    out: str
    name: str
    items: int = 0
    users: int = 0
    interactions: int = 0
    images_db: str | None = None
    images_stored: int = 0
    image_entries: int = 0  # entries in the reference LMDB
    unused_entries: int = 0  # reference LMDB entries that belong to no item
    missing_images: list[str] = field(default_factory=list)  # item ids with no entry in the reference LMDB
    bad_images: list[dict[str, str]] = field(default_factory=list)  # first MAX_EXAMPLES {item, key, reason}
    num_bad_images: int = 0
    image_format: str = "png"
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"imported {self.name!r} from {self.source} into {self.out} in {self.seconds:.1f} s: "
                 f"{self.users:,} users, {self.items:,} items, {self.interactions:,} interactions"]
        if self.images_db is None:
            lines.append("  images: no reference image LMDB found; text-only domain")
        else:
            example = f" (e.g. {', '.join(self.missing_images[:5])})" if self.missing_images else ""
            lines.append(f"  images: {self.images_stored:,} stored as {self.image_format}, "
                         f"{len(self.missing_images):,} items without an image{example}, "
                         f"{self.num_bad_images:,} unreadable, {self.unused_entries:,} unused LMDB entries")
        return "\n".join(lines)


def _open_reference_lmdb(path: Path) -> lmdb.Environment:
    # The reference opens its LMDB with subdir=os.path.isdir(path): both a folder and a single file occur.
    try:
        return lmdb.open(str(path), subdir=path.is_dir(), readonly=True, lock=False, readahead=False,
                         max_readers=8)
    except lmdb.Error as e:
        raise DataError(f"cannot open the LMDB ({e})", path) from None


def import_reference(source: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                     image_format: Literal["png", "jpeg"] = "png", empty_title: Literal["error", "blank"] = "error",
                     overwrite: bool = False, progress: bool = True) -> ReferenceImportReport:
    """Convert the reference release in ``source`` into the domain folder ``out``, atomically.

    Tables are validated as any domain is (unknown items, duplicate ids, bad UTF-8 are errors naming the line).
    Images: each item's pickled value is unpickled with :class:`RestrictedUnpickler` and re-encoded; a value
    that asks for any other global stops the import (nothing is written) with an error naming its key; values
    that are merely corrupt are listed in the report and that item has no image.
    """
    start = time.perf_counter()
    if image_format not in ("png", "jpeg"):
        raise PmmrecError(f"image format must be png or jpeg (got {image_format!r})")
    source, out = Path(source), Path(out)
    files = find_reference_files(source, name)
    if out.exists() and not overwrite:
        raise PmmrecError(f"{out} already exists; pass --overwrite to replace it")
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise PmmrecError(f"--out {out} contains the input folder {source}; choose another output folder")

    item_ids, titles = read_items(files.texts, empty_title)
    user_ids, sequences = read_users(files.users, {iid: i + 1 for i, iid in enumerate(item_ids)})
    report = ReferenceImportReport(str(source), str(out), files.name, len(item_ids), len(user_ids),
                                   int(sum(len(s) for s in sequences)), image_format=image_format)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_domain_tables(tmp, item_ids, titles, user_ids, sequences, numbered=True)
        if files.images is not None:
            report.images_db = str(files.images)
            _convert_images(files.images, item_ids, tmp / IMAGES_DB, report, image_format, progress)
            if report.images_stored == 0:  # an empty database would only hide that every image is missing
                shutil.rmtree(tmp / IMAGES_DB)
                log.warning("no item of %s has a readable image in %s", files.texts, files.images)
        report.seconds = round(time.perf_counter() - start, 3)
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    log.info("%s", report.summary())
    return report


def _convert_images(db_path: Path, item_ids: list[str], dest: Path, report: ReferenceImportReport,
                    image_format: Literal["png", "jpeg"], progress: bool) -> None:
    env = _open_reference_lmdb(db_path)
    try:
        report.image_entries = int(env.stat()["entries"])
        with env.begin(buffers=False) as txn:

            def images():
                for item_id in tqdm(item_ids, desc="images", unit="img", disable=not progress, leave=False):
                    key = reference_key(item_id)
                    value = txn.get(key.encode("utf-8"))
                    if value is None:
                        report.missing_images.append(item_id)
                        continue
                    try:
                        pixels = unpickle_image(value)
                    except RefusedPickle as e:
                        # Raised inside the write: the temporary output is removed and nothing is left.
                        raise DataError(f"{e} (item {item_id!r}); the database may be hostile, nothing was imported",
                                        db_path, field=f"key {key!r}") from None
                    except ValueError as e:
                        report.num_bad_images += 1
                        report.missing_images.append(item_id)
                        if len(report.bad_images) < MAX_EXAMPLES:
                            report.bad_images.append({"item": item_id, "key": key, "reason": str(e)})
                        continue
                    report.images_stored += 1
                    yield item_id, encode_array(pixels, image_format)

            write_image_db(dest, images())
    finally:
        env.close()
    report.unused_entries = max(0, report.image_entries - report.images_stored - report.num_bad_images)
    for bad in report.bad_images[:5]:
        log.warning("unreadable image for item %s (key %s): %s", bad["item"], bad["key"], bad["reason"])
