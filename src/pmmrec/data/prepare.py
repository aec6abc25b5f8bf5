"""``pmmrec data prepare``: turn a raw interaction log plus item metadata into domain folders (docs/design.md §3).

Inputs are a generic interaction table (``user,item,timestamp``; CSV, TSV or Parquet, optionally ``.gz``) and an
item metadata table (``item,title[,image_path][,genres...]``). The steps, in order:

1. read both tables, validating every row (errors name the file, line and column; :mod:`pmmrec.data.tables`);
2. drop exact duplicate ``(user, item, timestamp)`` rows, and rows whose item is not in the metadata;
3. (``split_by``) assign each item to the first group whose values it carries, one domain per group;
4. per domain: iterative k-core filtering (off by default), then drop users with fewer than ``min_seq_len``
   interactions, repeated until both hold; items left with no interaction leave the catalogue;
5. sort each user's interactions stably by time (ties keep file order) and write ``items.tsv``, ``users.tsv``,
   ``images.lmdb`` (when images are given) and ``prepare_report.json``.

Everything is built in a temporary folder that replaces ``out`` only when complete, so a failure leaves nothing.

Ids are stripped of surrounding spaces; an id that still contains whitespace is an error naming its line rather
than being rewritten, because the ids written are the ones users later send to the recommender and the keys of
the image database: a silent rewrite would make them disagree with the user's own systems.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pmmrec.data.domain import IMAGES_DB, MAX_OFFENDERS, write_domain_tables
from pmmrec.data.tables import InteractionLog, ItemTable, PrepareColumns, read_interactions, read_items
from pmmrec.errors import DataError, PmmrecError
from pmmrec.utils.io import atomic_dir

log = logging.getLogger(__name__)

REPORT_FILE = "prepare_report.json"


@dataclass
class DomainReport:
    """What one written domain holds, and what its own filters dropped."""

    name: str
    path: str
    users: int = 0
    items: int = 0
    interactions: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    images_stored: int | None = None  # None: no images were built
    missing_images: list[str] = field(default_factory=list)  # item ids with no image file
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) from the image builder


@dataclass
class PrepareReport:
    """What ``prepare_domain`` read, dropped (and why) and wrote. Saved as ``prepare_report.json``."""

    interactions_file: str
    items_file: str
    out: str
    settings: dict
    rows_read: int = 0
    items_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    unknown_item_examples: list[str] = field(default_factory=list)  # "line N: 'id'" for the first few
    domains: list[DomainReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        lines = [f"prepared {len(self.domains)} domain(s) under {self.out} in {self.seconds:.1f} s from "
                 f"{self.rows_read:,} interactions and {self.items_read:,} items"]
        dropped = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.dropped.items() if v)
        lines.append(f"  dropped: {dropped or 'nothing'}")
        for d in self.domains:
            lines.append(f"  {d.name}: {d.users:,} users, {d.items:,} items, {d.interactions:,} interactions"
                         f" -> {d.path}")
            dropped = ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in d.dropped.items() if v)
            if dropped:
                lines.append(f"    dropped: {dropped}")
            if d.images_stored is not None:
                missing = (f" (e.g. {', '.join(d.missing_images[:MAX_OFFENDERS])})" if d.missing_images else "")
                lines.append(f"    images: {d.images_stored:,} stored, {len(d.missing_images):,} missing{missing}, "
                             f"{len(d.bad_images):,} unreadable")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Filtering


def _duplicate_mask(user: np.ndarray, item: np.ndarray, t: np.ndarray) -> np.ndarray:
    """True for every row that repeats an earlier row's (user, item, timestamp)."""
    order = np.lexsort((np.arange(len(user)), item, t, user))  # stable: the first occurrence comes first
    u, i, s = user[order], item[order], t[order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (s[1:] == s[:-1])
    dup = np.zeros(len(order), dtype=bool)
    dup[order] = same
    return dup


def _filter_domain(user: np.ndarray, item: np.ndarray, kcore: int, min_seq_len: int,
                   dropped: dict[str, int]) -> np.ndarray:
    """Keep-mask after iterative k-core and the short-user filter, repeated until both hold (counts in place)."""
    keep = np.ones(len(user), dtype=bool)
    n_users = int(user.max()) + 1 if len(user) else 0
    n_items = int(item.max()) + 1 if len(item) else 0
    for key in ("kcore_users", "kcore_items", "kcore_interactions", "short_users", "short_user_interactions"):
        dropped.setdefault(key, 0)
    while True:
        changed = False
        if kcore > 0:
            while True:  # users and items below k, until none is left
                u_count = np.bincount(user[keep], minlength=n_users)
                i_count = np.bincount(item[keep], minlength=n_items)
                bad_u = (u_count > 0) & (u_count < kcore)
                bad_i = (i_count > 0) & (i_count < kcore)
                if not (bad_u.any() or bad_i.any()):
                    break
                drop = keep & (bad_u[user] | bad_i[item])
                keep &= ~drop
                after_u = np.bincount(user[keep], minlength=n_users)
                after_i = np.bincount(item[keep], minlength=n_items)
                dropped["kcore_users"] += int(((u_count > 0) & (after_u == 0)).sum())
                dropped["kcore_items"] += int(((i_count > 0) & (after_i == 0)).sum())
                dropped["kcore_interactions"] += int(drop.sum())
                changed = True
        u_count = np.bincount(user[keep], minlength=n_users)
        short = (u_count > 0) & (u_count < min_seq_len)
        if short.any():
            drop = keep & short[user]
            keep &= ~drop
            dropped["short_users"] += int(short.sum())
            dropped["short_user_interactions"] += int(drop.sum())
            changed = kcore > 0  # only k-core can be broken again by removing users
        if not changed:
            return keep


def _assign_groups(items: ItemTable, groups: dict[str, list[str]], path: Path) -> np.ndarray:
    """Group index per item: the first group (in the given order) sharing a value with the item; -1 for none."""
    owner: dict[str, int] = {}
    for g, (name, values) in enumerate(groups.items()):
        for value in values:
            if value in owner:
                log.warning("value %r of group %r is already claimed by group %r; it has no effect there",
                            value, name, list(groups)[owner[value]])
            else:
                owner[value] = g
    present = {v for vs in items.values or () for v in vs}
    unseen = sorted(set(owner) - present)
    if unseen:
        log.warning("group values found on no item in %s: %s (values present: %s)", path, unseen, sorted(present))
    assigned = np.full(len(items.ids), -1, dtype=np.int64)
    for k, values in enumerate(items.values or ()):
        hits = [owner[v] for v in values if v in owner]
        if hits:
            assigned[k] = min(hits)
    return assigned


def _check_groups(split_by: str | None, groups: dict[str, list[str]] | None) -> None:
    if (split_by is None) != (groups is None):
        raise PmmrecError("split_by and groups go together: name the column and the groups of its values")
    if groups is None:
        return
    if not groups:
        raise PmmrecError("groups is empty: give at least one NAME=VALUE,VALUE group")
    for name, values in groups.items():
        if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise PmmrecError(f"group name {name!r} is not a usable folder name")
        if not values or not all(isinstance(v, str) and v for v in values):
            raise PmmrecError(f"group {name!r} needs a non-empty list of values")


def _drop_rows(meta: ItemTable, data: InteractionLog, empty_title: str, report: PrepareReport, items_path: Path,
               title_col: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop unknown items, exact duplicates and (by choice) empty-titled items.

    Returns the row keep-mask, each row's item position (0 where unknown: a safe index under the mask) and which
    metadata items still have an interaction.
    """
    keep = data.item >= 0
    item = np.where(keep, data.item, 0)
    report.dropped["unknown_item_interactions"] = int((~keep).sum())
    known = np.flatnonzero(keep)
    dup = np.zeros(len(keep), dtype=bool)
    dup[known] = _duplicate_mask(data.user[known], item[known], data.time[known])
    report.dropped["duplicate_interactions"] = int(dup.sum())
    keep &= ~dup
    used = np.zeros(len(meta.ids), dtype=bool)
    used[item[keep]] = True
    empty = np.array([not t for t in meta.titles], dtype=bool)
    if (empty & used).any():
        first = int(np.flatnonzero(empty & used)[0])
        if empty_title == "error":
            raise DataError(f"empty title for item {meta.ids[first]!r}, which has interactions "
                            "(prepare with empty_title blank or drop to allow)", items_path, meta.lines[first],
                            title_col)
        if empty_title == "drop":
            report.dropped["empty_title_items"] = int((empty & used).sum())
            drop = keep & empty[item]
            report.dropped["empty_title_interactions"] = int(drop.sum())
            keep &= ~drop
            used &= ~empty
    report.dropped["items_never_interacted"] = int((~used).sum()) - report.dropped.get("empty_title_items", 0)
    return keep, item, used


@dataclass
class _Planned:
    report: DomainReport
    sub: str | None  # folder under out (None: out itself)
    catalogue: np.ndarray  # metadata positions of the domain's items, in metadata order
    user_ids: list[str]
    sequences: list[np.ndarray]  # per user: item numbers (1-based, into catalogue), oldest first


def _make_domain(name: str, sub: str | None, idx: np.ndarray, data: InteractionLog, item: np.ndarray, kcore: int,
                 min_seq_len: int, out: Path, source: Path) -> _Planned:
    """Filter the rows ``idx`` of one domain, then order them into per-user sequences."""
    rep = DomainReport(name=name, path=str(out / sub) if sub else str(out))
    before = len(np.unique(item[idx]))
    idx = idx[_filter_domain(data.user[idx], item[idx], kcore, min_seq_len, rep.dropped)]
    if not len(idx):
        raise PmmrecError(f"{source}: domain {name!r}: no interactions left after filtering "
                          f"(kcore={kcore}, min_seq_len={min_seq_len})")
    order = idx[np.lexsort((data.time[idx], data.user[idx]))]  # stable, and idx is in file order: ties keep it
    catalogue = np.unique(item[order])
    rep.dropped["short_user_items"] = before - len(catalogue) - rep.dropped.get("kcore_items", 0)
    users = data.user[order]
    cuts = np.flatnonzero(users[1:] != users[:-1]) + 1
    sequences = np.split(np.searchsorted(catalogue, item[order]) + 1, cuts)
    user_ids = [data.users[u] for u in users[np.r_[0, cuts]]]
    rep.users, rep.items, rep.interactions = len(user_ids), len(catalogue), len(order)
    return _Planned(rep, sub, catalogue, user_ids, sequences)


def _check_outside(out: Path, inputs: list[Path | None]) -> None:
    """Refuse an ``out`` that holds an input: replacing ``out`` would delete the user's raw data."""
    target = out.resolve()
    for p in inputs:
        if p is not None and (p.resolve() == target or target in p.resolve().parents):
            raise PmmrecError(f"--out {out} contains the input {p}; choose another output folder")


# ---------------------------------------------------------------------------------------------------------------
# Images


def _image_stems(image_dir: Path) -> set[str]:
    """Stems of the image files under ``image_dir``, by the image builder's rule (hidden entries skipped)."""
    from pmmrec.data.image_db import IMAGE_EXTENSIONS

    stems = set()
    for _folder, dirs, names in os.walk(image_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        stems.update(os.path.splitext(n)[0] for n in names
                     if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    return stems


def _build_images(image_dir: Path, stems: set[str], meta: ItemTable, positions: np.ndarray, dest: Path,
                  report: DomainReport, workers: int | None, resize: int | None, progress: bool) -> None:
    """Store the images of the items at ``positions`` into ``dest``; record what is stored, missing and bad.

    A file is found by its stem: the item id, or the stem of the path the metadata's image column gives.
    """
    from pmmrec.data.image_db import build_image_db, image_keys

    ids = [meta.ids[p] for p in positions]
    by_stem = {}
    for iid, named in zip(ids, (meta.images[p] for p in positions), strict=True):
        by_stem[Path(named).stem if named else iid] = iid
    report.images_stored = 0
    report.missing_images = list(ids)
    if not stems & by_stem.keys():
        # The builder refuses to write an empty database; a domain without any image is reported instead.
        log.warning("no image in %s belongs to an item of domain %r", image_dir, report.name)
        return
    built = build_image_db(image_dir, dest, workers=workers, resize=resize, id_map=by_stem.get,
                           allowed_ids=set(ids), progress=progress)
    stored = image_keys(dest)
    report.images_stored = int(built.stored)
    report.missing_images = [iid for iid in ids if iid not in stored]
    report.bad_images = [(str(p), str(reason)) for p, reason in built.bad]
    report.bad_images += [(", ".join(paths), f"several images for item {iid!r}; none stored")
                          for iid, paths in built.duplicates]


# ---------------------------------------------------------------------------------------------------------------
# The command


def prepare_domain(interactions: str | os.PathLike, items: str | os.PathLike, out: str | os.PathLike, *,
                   image_dir: str | os.PathLike | None = None, columns: PrepareColumns | None = None,
                   kcore: int = 0, min_seq_len: int = 3, split_by: str | None = None,
                   groups: dict[str, list[str]] | None = None,
                   empty_title: Literal["error", "blank", "drop"] = "error", overwrite: bool = False,
                   workers: int | None = None, resize: int | None = None, progress: bool = True) -> PrepareReport:
    """Prepare a domain folder (or, with ``split_by``, one folder per group) from raw files, atomically.

    Args:
        interactions: CSV / TSV / Parquet of ``user, item, timestamp`` rows (header required; ``.gz`` allowed).
        items: item metadata table with at least ``item, title`` (plus ``image_path``, the ``split_by`` column).
        out: the domain folder to write; with ``split_by``, the parent of one folder per group.
        image_dir: folder of item images, each named by its item id (``posters/1.jpg`` for item ``1``) unless
            the metadata's image column names the file (relative to this folder).
        columns: column names and separators (:class:`PrepareColumns`).
        kcore: keep only users and items with at least ``kcore`` interactions, iteratively (0: off).
        min_seq_len: drop users with fewer interactions (after k-core).
        split_by: a list-valued metadata column (``genres``) whose values ``groups`` map to domains.
        groups: ``{domain name: [values]}``. An item goes to the FIRST group, in this order, sharing a value with
            it, so item sets are disjoint: list a held-out target group first to let it claim every item it
            touches. Each user's sequence in a domain keeps only that domain's items. Unmatched items are dropped.
        empty_title: an item with an empty title that has interactions is an ``error``, kept (``blank``) or
            dropped with its interactions (``drop``).
        overwrite: replace an existing ``out`` (only once the new one is complete).
        workers, resize, progress: passed to the image database builder.
    """
    start = time.perf_counter()
    interactions, items_path, out = Path(interactions), Path(items), Path(out)
    image_dir = Path(image_dir) if image_dir is not None else None
    columns = columns or PrepareColumns()
    _check_groups(split_by, groups)
    if kcore < 0 or min_seq_len < 0:
        raise PmmrecError(f"kcore and min_seq_len must be >= 0 (got {kcore}, {min_seq_len})")
    if empty_title not in ("error", "blank", "drop"):
        raise PmmrecError(f"empty_title must be error, blank or drop (got {empty_title!r})")
    if out.exists() and not overwrite:
        raise PmmrecError(f"{out} already exists; pass --overwrite to replace it")
    if image_dir is not None and not image_dir.is_dir():
        raise DataError("image folder not found", image_dir)
    _check_outside(out, [interactions, items_path, image_dir])

    report = PrepareReport(str(interactions), str(items_path), str(out), settings={
        "kcore": kcore, "min_seq_len": min_seq_len, "split_by": split_by, "groups": groups,
        "empty_title": empty_title, "image_dir": str(image_dir) if image_dir else None})
    meta, item_cols = read_items(items_path, columns, split_by)
    report.items_read = len(meta.ids)
    log.info("read %s items from %s", f"{len(meta.ids):,}", items_path)
    data, log_cols = read_interactions(interactions, columns, meta)
    report.rows_read = len(data.user)
    report.unknown_item_examples = [f"line {ln}: {iid!r}" for iid, ln in list(data.unknown.items())[:MAX_OFFENDERS]]
    report.dropped["unknown_items"] = len(data.unknown)
    report.settings["columns"] = {**log_cols, **{("meta_item" if k == "item" else k): v for k, v in item_cols.items()}}
    log.info("read %s interactions from %s", f"{report.rows_read:,}", interactions)

    keep, item, used = _drop_rows(meta, data, empty_title, report, items_path, item_cols["title"])
    if groups is None:
        plan = [(out.name, None, keep)]
    else:
        assigned = _assign_groups(meta, groups, items_path)
        group = assigned[item]
        report.dropped["no_group_items"] = int((used & (assigned < 0)).sum())
        report.dropped["no_group_interactions"] = int((keep & (group < 0)).sum())
        plan = [(name, name, keep & (group == g)) for g, name in enumerate(groups)]
    domains = []
    for name, sub, rows in plan:
        if not rows.any():
            example = report.unknown_item_examples[:1]
            why = (f" (no item carries {groups[name]})" if groups else
                   f": none of its {report.rows_read:,} row(s) names a usable item of {items_path}"
                   + (f" (unknown items, e.g. {example[0]})" if example else ""))
            raise PmmrecError(f"{interactions}: domain {name!r} has no interactions{why}")
        domains.append(_make_domain(name, sub, np.flatnonzero(rows), data, item, kcore, min_seq_len, out,
                                    interactions))
        report.domains.append(domains[-1].report)

    stems = _image_stems(image_dir) if image_dir is not None else set()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for d in domains:
            folder = tmp / d.sub if d.sub else tmp
            folder.mkdir(parents=True, exist_ok=True)
            write_domain_tables(folder, [meta.ids[p] for p in d.catalogue], [meta.titles[p] for p in d.catalogue],
                                d.user_ids, d.sequences, numbered=True)
            if image_dir is not None:
                _build_images(image_dir, stems, meta, d.catalogue, folder / IMAGES_DB, d.report, workers, resize,
                              progress)
        report.seconds = round(time.perf_counter() - start, 3)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report
