"""RecBole atomic files in and out (``pmmrec data import-atomic`` / ``export-atomic``; docs/design.md §3).

RecBole (and the RecBole-family baselines: UniSRec, VQ-Rec, MISSRec) reads tab-separated *atomic files* whose
header types every column, ``name:type`` with type ``token``, ``token_seq`` (space-separated tokens), ``float``
or ``float_seq``. Two layouts are read:

* **interactions**: ``<name>.inter`` (``user_id:token item_id:token timestamp:float ...``) plus ``<name>.item``
  (``item_id:token title:token_seq [image:token]``). This is :func:`pmmrec.data.prepare.prepare_domain` with the
  typed column names: sorted by time, deduplicated, short users dropped, images (paths relative to the folder, or
  to ``image_dir``) through the image database builder.
* **benchmark files**: ``<name>.train.inter``, ``<name>.valid.inter``, ``<name>.test.inter``, the layout RecBole
  loads with ``benchmark_filename: [train, valid, test]``. For sequential models each row is already a training
  or evaluation example, ``user_id:token item_id_list:token_seq item_id:token`` (the history, then the target).
  Each user's sequence is rebuilt from its rows (and every row is checked to continue it).

``export_atomic`` (:mod:`pmmrec.data.atomic_export`) writes a domain's exact leave-one-out split (:func:`pmmrec.data.split.leave_one_out`) as
benchmark files: one training row per position of the training part, one validation row and one test row per
user, histories cut to ``max_seq_len`` exactly as pmmrec's user encoder sees them, plus ``<name>.item``, a
RecBole config (``<name>.yaml``) and a split manifest (``<name>.split.json``, with a SHA-256 per file). Importing
the exported folder gives back a domain whose split is identical, so a RecBole model and a pmmrec model are
trained and tested on precisely the same examples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pmmrec.data.domain import IMAGES_DB, _read_lines, write_domain_tables
from pmmrec.errors import DataError, PmmrecError
from pmmrec.utils.io import atomic_dir

log = logging.getLogger(__name__)

TYPES = ("token", "token_seq", "float", "float_seq")
SPLITS = ("train", "valid", "test")
BENCHMARK_HEADER = ("user_id:token", "item_id_list:token_seq", "item_id:token")
IMAGE_FIELDS = ("image", "image_path", "image_file", "img", "poster")  # tried in order when not named
REPORT_FILE = "import_report.json"
IMAGE_FOLDER = "images"
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # dataset names and exported image file stems


def read_header(path: Path) -> list[tuple[str, str]]:
    """The ``(name, type)`` of every column of an atomic file; an untyped or unknown type names the field."""
    for number, line in _read_lines(path):
        fields = []
        for column in line.split("\t"):
            name, sep, kind = column.strip().rpartition(":")
            if not sep or not name:
                raise DataError(f"column {column!r} has no type; atomic headers are name:type, e.g. user_id:token",
                                path, number, column)
            if kind not in TYPES:
                raise DataError(f"unknown type {kind!r} (RecBole types: {', '.join(TYPES)})", path, number, column)
            fields.append((name, kind))
        return fields
    raise DataError("empty file (a typed header line is required)", path)


def _column(fields: list[tuple[str, str]], wanted: str | None, candidates: tuple[str, ...], path: Path,
            what: str, required: bool = True) -> str | None:
    """The full ``name:type`` header of the column named ``wanted`` (or the first of ``candidates`` present)."""
    names = {name: f"{name}:{kind}" for name, kind in fields}
    for name in ((wanted,) if wanted else candidates):
        if name in names:
            return names[name]
    if required:
        raise DataError(f"no {what} column {wanted or candidates[0]!r}; the columns are {list(names)}", path, 1)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Import


@dataclass
class AtomicImportReport:
    """What ``import_atomic`` read and wrote (the interaction layout also writes prepare_report.json)."""

    source: str
    out: str
    layout: Literal["interactions", "benchmark"]
    name: str
    users: int = 0
    items: int = 0
    interactions: int = 0
    images_stored: int | None = None
    missing_images: list[str] = field(default_factory=list)
    changed_since_export: list[str] | None = None  # benchmark files edited after export-atomic (None: no manifest)
    seconds: float = 0.0

    def summary(self) -> str:
        images = "" if self.images_stored is None else \
            f"; {self.images_stored:,} images stored, {len(self.missing_images):,} items without one"
        return (f"imported RecBole {self.layout} files {self.name!r} from {self.source} into {self.out}: "
                f"{self.users:,} users, {self.items:,} items, {self.interactions:,} interactions{images} "
                f"({self.seconds:.1f} s)")


def find_atomic_files(folder: Path, name: str | None) -> tuple[str, Literal["interactions", "benchmark"]]:
    """The dataset name and layout in ``folder``: benchmark files win over a plain ``<name>.inter``."""
    if not folder.is_dir():
        raise DataError("folder not found", folder)
    if name is None:
        names = {p.name[: -len(".train.inter")] for p in folder.glob("*.train.inter")}
        names = names or {p.name[: -len(".inter")] for p in folder.glob("*.inter")}
        if len(names) != 1:
            raise PmmrecError(f"{folder}: expected one RecBole dataset (<name>.inter, or <name>.train/valid/test.inter)"
                              f", found {sorted(names) or 'none'}; pass --name")
        name = names.pop()
    if all((folder / f"{name}.{s}.inter").is_file() for s in SPLITS):
        return name, "benchmark"
    if (folder / f"{name}.inter").is_file():
        return name, "interactions"
    raise DataError(f"no {name}.inter and no {name}.train/valid/test.inter", folder)


def import_atomic(source: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                  image_dir: str | os.PathLike | None = None, title_field: str | None = None,
                  image_field: str | None = None, min_seq_len: int = 3,
                  empty_title: Literal["error", "blank"] = "error", overwrite: bool = False,
                  progress: bool = True) -> AtomicImportReport:
    """Convert RecBole atomic files in ``source`` into the domain folder ``out``, atomically.

    ``title_field`` / ``image_field`` name the ``.item`` columns (default ``title``; ``image``, ``image_path``, ...
    when present). Image paths are relative to ``image_dir`` (default: ``source``). ``min_seq_len`` applies to
    the interaction layout; benchmark files already are a split, and the split's own filter applies later.
    """
    start = time.perf_counter()
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve() or out.resolve() in source.resolve().parents:
        raise PmmrecError(f"--out {out} contains the input folder {source}; choose another output folder")
    name, layout = find_atomic_files(source, name)
    item_file = source / f"{name}.item"
    if not item_file.is_file():
        raise DataError(f"no {item_file.name}: pmmrec needs item titles (an item file with a title column)", source)
    if out.exists() and not overwrite:
        raise PmmrecError(f"{out} already exists; pass --overwrite to replace it")
    item_fields = read_header(item_file)
    item_col = _column(item_fields, None, ("item_id",), item_file, "item id")
    title_col = _column(item_fields, title_field, ("title",), item_file, "title")
    image_col = _column(item_fields, image_field, IMAGE_FIELDS, item_file, "image", required=image_field is not None)
    images = Path(image_dir) if image_dir is not None else (source if image_col else None)
    report = AtomicImportReport(str(source), str(out), layout, name)
    if layout == "interactions":
        _import_interactions(source / f"{name}.inter", item_file, out, item_col, title_col, image_col, images,
                             min_seq_len, empty_title, overwrite, progress, report)
    else:
        _import_benchmark(source, name, item_file, out, (item_col, title_col, image_col), images, empty_title,
                          overwrite, progress, report)
    report.seconds = round(time.perf_counter() - start, 3)
    log.info("%s", report.summary())
    return report


def _import_interactions(inter: Path, item_file: Path, out: Path, item_col: str, title_col: str,
                         image_col: str | None, images: Path | None, min_seq_len: int, empty_title: str,
                         overwrite: bool, progress: bool, report: AtomicImportReport) -> None:
    from pmmrec.data.prepare import prepare_domain
    from pmmrec.data.tables import PrepareColumns

    fields = read_header(inter)
    columns = PrepareColumns(
        user=_column(fields, None, ("user_id",), inter, "user id"),
        item=_column(fields, None, ("item_id",), inter, "item id"), meta_item=item_col,
        time=_column(fields, None, ("timestamp",), inter, "timestamp", required=False),
        title=title_col, image=image_col, sep="\t")
    if columns.time is None:
        log.warning("%s has no timestamp column: the file order is taken as chronological", inter)
    prepared = prepare_domain(inter, item_file, out, image_dir=images if image_col else None, columns=columns,
                              min_seq_len=min_seq_len, empty_title=empty_title, overwrite=overwrite,
                              progress=progress)
    domain = prepared.domains[0]
    report.users, report.items, report.interactions = domain.users, domain.items, domain.interactions
    report.images_stored, report.missing_images = domain.images_stored, domain.missing_images


def _benchmark_rows(path: Path, item_index: dict[str, int]):
    """Yield ``(line, user, history, target)``; unknown items and malformed rows name the line."""
    fields = read_header(path)
    names = [f"{n}:{k}" for n, k in fields]
    try:
        cols = [names.index(h) for h in BENCHMARK_HEADER]
    except ValueError:
        raise DataError(f"expected the columns {list(BENCHMARK_HEADER)} (RecBole's sequential benchmark layout), "
                        f"got {names}", path, 1) from None
    for number, line in _read_lines(path):
        if number == 1 or not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(names):
            raise DataError(f"expected {len(names)} fields, got {len(parts)}", path, number)
        user, history, target = (parts[c].strip() for c in cols)
        if not user:
            raise DataError("empty user id", path, number, "user_id")
        for item in [*history.split(), target]:
            if item not in item_index:
                raise DataError(f"item {item!r} is not in the item file", path, number, "item_id")
        yield number, user, history.split(), target


def _continues(history: list[str], seq: list[str]) -> bool:
    return len(history) <= len(seq) and (not history or seq[-len(history):] == history)


def _import_benchmark(source: Path, name: str, item_file: Path, out: Path, cols: tuple[str, str, str | None],
                      images: Path | None, empty_title: str, overwrite: bool, progress: bool,
                      report: AtomicImportReport) -> None:
    report.changed_since_export = changed_files(source, name)
    if report.changed_since_export:
        log.warning("%s differ from the split manifest %s.split.json: edited since export-atomic wrote them",
                    ", ".join(report.changed_since_export), name)
    item_ids, titles, image_paths = _read_item_file(item_file, *cols, empty_title)
    index = {iid: i for i, iid in enumerate(item_ids)}
    paths = {s: source / f"{name}.{s}.inter" for s in SPLITS}
    train: dict[str, list[tuple[int, list[str], str]]] = {}
    for number, user, history, target in _benchmark_rows(paths["train"], index):
        train.setdefault(user, []).append((number, history, target))
    held: dict[str, dict[str, tuple[int, list[str], str]]] = {"valid": {}, "test": {}}
    for split in ("valid", "test"):
        for number, user, history, target in _benchmark_rows(paths[split], index):
            if user in held[split]:
                raise DataError(f"user {user!r} has a second row (first on line {held[split][user][0]})",
                                paths[split], number, "user_id")
            held[split][user] = (number, history, target)
    for split, other in (("valid", "test"), ("test", "valid")):
        extra = [u for u in held[split] if u not in held[other]]
        if extra:
            raise DataError(f"user {extra[0]!r} has a {split} row but no {other} row", paths[split],
                            held[split][extra[0]][0], "user_id")
    stray = [u for u in train if u not in held["test"]]
    if stray:
        raise DataError(f"user {stray[0]!r} has training rows but no test row", paths["train"], train[stray[0]][0][0],
                        "user_id")

    user_ids, sequences = [], []
    for user in held["test"]:
        rows = train.get(user, [])
        seq = list(rows[0][1]) if rows else list(held["valid"][user][1])
        for number, history, target in rows:
            if not history or not _continues(history, seq):
                raise DataError(f"the history of user {user!r} does not continue the user's earlier rows",
                                paths["train"], number, "item_id_list")
            seq.append(target)
        for split in ("valid", "test"):
            number, history, target = held[split][user]
            if not _continues(history, seq):
                raise DataError(f"the history of user {user!r} does not continue the user's training rows",
                                paths[split], number, "item_id_list")
            seq.append(target)
        user_ids.append(user)
        sequences.append(seq)
    if not user_ids:
        raise DataError("no users", paths["test"])
    report.users, report.items = len(user_ids), len(item_ids)
    report.interactions = sum(len(s) for s in sequences)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_domain_tables(tmp, item_ids, titles, user_ids, sequences)
        if images is not None and any(image_paths):
            _build_images(images, item_ids, image_paths, tmp / IMAGES_DB, report, progress)
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")


def _read_item_file(path: Path, item_col: str, title_col: str, image_col: str | None, empty_title: str
                    ) -> tuple[list[str], list[str], list[str | None]]:
    header = [f"{n}:{k}" for n, k in read_header(path)]
    at = [header.index(c) if c else None for c in (item_col, title_col, image_col)]
    ids, titles, images, seen = [], [], [], {}
    for number, line in _read_lines(path):
        if number == 1 or not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != len(header):
            raise DataError(f"expected {len(header)} fields, got {len(parts)}", path, number)
        item, title = parts[at[0]].strip(), " ".join(parts[at[1]].split())
        if not item or item.split() != [item]:
            raise DataError(f"bad item id {item!r}", path, number, item_col)
        if item in seen:
            raise DataError(f"duplicate item id {item!r} (first on line {seen[item]})", path, number, item_col)
        if not title and empty_title == "error":
            raise DataError(f"empty title for item {item!r} (pass --empty-title blank to allow)", path, number,
                            title_col)
        seen[item] = number
        ids.append(item)
        titles.append(title)
        images.append((parts[at[2]].strip() or None) if at[2] is not None else None)
    if not ids:
        raise DataError("no items", path)
    return ids, titles, images


def _build_images(image_dir: Path, item_ids: list[str], image_paths: list[str | None], dest: Path,
                  report: AtomicImportReport, progress: bool) -> None:
    from pmmrec.data.image_db import build_image_db, image_keys

    by_stem = {Path(p).stem: iid for iid, p in zip(item_ids, image_paths, strict=True) if p}
    built = build_image_db(image_dir, dest, id_map=by_stem.get, allowed_ids=set(item_ids), progress=progress)
    stored = image_keys(dest)
    report.images_stored = built.stored
    report.missing_images = [iid for iid in item_ids if iid not in stored]
    for path, reason in built.bad[:5]:
        log.warning("bad image %s: %s", path, reason)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changed_files(folder: Path, name: str) -> list[str] | None:
    """Files of an exported folder whose SHA-256 differs from its manifest's; None when there is no manifest."""
    path = folder / f"{name}.split.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        digests = dict(manifest["files"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"unreadable split manifest ({e})", path) from None
    return [f for f, digest in digests.items() if not (folder / f).is_file() or sha256_file(folder / f) != digest]


