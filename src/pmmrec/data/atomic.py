"""RecBole atomic files in and out (``pmmrec data import-atomic`` / ``export-atomic``; DESIGN section 3).

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

``export_atomic`` writes a domain's exact leave-one-out split (:func:`pmmrec.data.split.leave_one_out`) as
benchmark files: one training row per position of the training part, one validation row and one test row per
user, histories cut to ``max_seq_len`` exactly as pmmrec's user encoder sees them, plus ``<name>.item``, a
RecBole config (``<name>.yaml``) and a split manifest (``<name>.split.json``, with a SHA-256 per file). Importing
the exported folder gives back a domain whose split is identical, so a RecBole model and a pmmrec model are
trained and tested on precisely the same examples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from PIL import Image

from pmmrec import __version__
from pmmrec.data.domain import IMAGES_DB, _read_lines, read_domain, write_domain_tables
from pmmrec.data.split import leave_one_out
from pmmrec.errors import DataError, PmmrecError
from pmmrec.utils.io import atomic_dir

log = logging.getLogger(__name__)

TYPES = ("token", "token_seq", "float", "float_seq")
SPLITS = ("train", "valid", "test")
BENCHMARK_HEADER = ("user_id:token", "item_id_list:token_seq", "item_id:token")
IMAGE_FIELDS = ("image", "image_path", "image_file", "img", "poster")  # tried in order when not named
REPORT_FILE = "import_report.json"
IMAGE_FOLDER = "images"
_SAFE_STEM = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}


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
    from pmmrec.data.prepare import PrepareColumns, prepare_domain

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


# ---------------------------------------------------------------------------------------------------------------
# Export


@dataclass
class AtomicExportReport:
    out: str
    name: str
    users: int
    items: int
    rows: dict[str, int]
    dropped_users: int
    images: int | None

    def summary(self) -> str:
        images = "" if self.images is None else f", {self.images:,} images"
        return (f"exported {self.users:,} users and {self.items:,} items ({self.dropped_users:,} users too short "
                f"dropped) as RecBole benchmark files {self.name}.{{train,valid,test}}.inter in {self.out}: "
                f"{self.rows['train']:,} / {self.rows['valid']:,} / {self.rows['test']:,} rows{images}")


def export_atomic(domain_dir: str | os.PathLike, out: str | os.PathLike, *, name: str | None = None,
                  max_seq_len: int = 20, min_seq_len: int = 3, images: bool = False,
                  overwrite: bool = False) -> AtomicExportReport:
    """Write the leave-one-out split of the domain at ``domain_dir`` as RecBole benchmark files in ``out``.

    The split is pmmrec's, with these ``max_seq_len`` / ``min_seq_len`` (use the run's ``data.*`` values).
    ``images``: also copy each item's image file into ``out/images/`` and name it in the ``.item`` file.
    """
    out = Path(out)
    name = name or out.name
    if not _SAFE_STEM.fullmatch(name):
        raise PmmrecError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (RecBole's file names)")
    if out.resolve() == Path(domain_dir).resolve() or out.resolve() in Path(domain_dir).resolve().parents:
        raise PmmrecError(f"--out {out} contains the domain {domain_dir}; choose another output folder")
    domain = read_domain(domain_dir, empty_title="blank")
    split = leave_one_out(domain, max_seq_len, min_seq_len)
    bad = next((u for u in split.user_ids if u.split() != [u]), None)
    if bad is not None:
        raise DataError(f"user id {bad!r} contains whitespace, which a RecBole token cannot hold",
                        domain.path, field="user_id")
    ids = np.asarray(["", *split.item_ids], dtype=object)  # item number k -> raw id (0: padding)
    rows = {"train": 0, "valid": 0, "test": 0}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with contextlib.ExitStack() as stack:
            handles = {s: stack.enter_context(open(tmp / f"{name}.{s}.inter", "w", encoding="utf-8"))
                       for s in SPLITS}
            for h in handles.values():
                h.write("\t".join(BENCHMARK_HEADER) + "\n")
            for user, tr, va, te in zip(split.user_ids, split.train, split.valid, split.test, strict=True):
                for j in range(1, len(tr)):  # position j predicts tr[j] from (at most L) items before it
                    handles["train"].write(f"{user}\t{' '.join(ids[tr[max(0, j - max_seq_len):j]])}\t{ids[tr[j]]}\n")
                    rows["train"] += 1
                for which, seq in (("valid", va), ("test", te)):
                    handles[which].write(f"{user}\t{' '.join(ids[seq[:-1]])}\t{ids[seq[-1]]}\n")
                    rows[which] += 1
        stored = _export_items(tmp, name, split, images)
        manifest = _manifest(tmp, name, domain_dir, split, max_seq_len, min_seq_len, rows)
        (tmp / f"{name}.split.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / f"{name}.yaml").write_text(_recbole_config(max_seq_len, images), encoding="utf-8")
    report = AtomicExportReport(str(out), name, split.num_users, split.num_items, rows, split.num_dropped_users,
                                stored)
    log.info("%s", report.summary())
    return report


def _export_items(folder: Path, name: str, split, images: bool) -> int | None:
    """``<name>.item`` (and with ``images``, the image files); returns how many images were written."""
    from pmmrec.data.image_db import ImageDB

    paths: list[str] = [""] * split.num_items
    stored = None
    if images:
        stored = 0
        (folder / IMAGE_FOLDER).mkdir()
        dbs: dict[Path, ImageDB] = {}
        try:
            for k, (db_path, key) in enumerate(split.image_sources):
                if db_path is None:
                    continue
                db = dbs.setdefault(db_path, ImageDB(db_path))
                data = db.get(key)
                if data is None:
                    continue
                iid = split.item_ids[k]
                stem = iid if _SAFE_STEM.fullmatch(iid) else f"item{k + 1}"
                paths[k] = f"{IMAGE_FOLDER}/{stem}.{_extension(data)}"
                (folder / paths[k]).write_bytes(data)
                stored += 1
        finally:
            for db in dbs.values():
                db.close()
    with open(folder / f"{name}.item", "w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq" + ("\timage:token\n" if images else "\n"))
        for k, (iid, title) in enumerate(zip(split.item_ids, split.titles, strict=True)):
            f.write(f"{iid}\t{' '.join(title.split())}" + (f"\t{paths[k]}\n" if images else "\n"))
    return stored


def _extension(data: bytes) -> str:
    import io

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _EXTENSIONS.get(image.format or "", "img")
    except Exception:  # Pillow raises many types; an undecodable image keeps its bytes under a neutral name
        return "img"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path, name: str, domain_dir, split, max_seq_len: int, min_seq_len: int,
              rows: dict[str, int]) -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {
        "format": "pmmrec-atomic-split", "version": 1, "pmmrec_version": __version__,
        "source_domain": str(domain_dir), "name": name,
        "split": {"method": "leave-one-out (pmmrec.data.split.leave_one_out)", "max_seq_len": max_seq_len,
                  "min_seq_len": min_seq_len, "kept_per_user": max_seq_len + 3},
        "users": split.num_users, "items": split.num_items, "dropped_users": split.num_dropped_users,
        "rows": rows,
        "targets": {"train": "every item of seq[:-2] after the first", "valid": "seq[-2]", "test": "seq[-1]"},
        "protocols": {"include_history": "what RecBole's full-sort evaluation of sequential models computes",
                      "exclude_history": "pmmrec's paper protocol: items earlier in the user's kept window are "
                                         "removed from the ranking"},
        "files": {p.name: _sha256(p) for p in files},
    }


def _recbole_config(max_seq_len: int, images: bool) -> str:
    config = {
        "benchmark_filename": list(SPLITS),
        "alias_of_item_id": ["item_id_list"],
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"]},
        "MAX_ITEM_LIST_LENGTH": max_seq_len,
        "eval_args": {"order": "TO", "mode": "full"},
        "train_neg_sample_args": None,
        "topk": [5, 10, 20],
        "metrics": ["Hit", "NDCG", "MRR"],
        "valid_metric": "NDCG@10",
    }
    note = ("# RecBole config for these benchmark files (the split pmmrec trains on; see the .split.json).\n"
            "# Item titles are in the .item file; add `item: [item_id, title]` to load_col for text-based models.\n")
    return note + yaml.safe_dump(config, sort_keys=False)


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
    return [f for f, digest in digests.items() if not (folder / f).is_file() or _sha256(folder / f) != digest]


