"""``pmmrec data sample``: a smaller domain made of randomly chosen users and everything they touch (docs/design.md §3).

A domain folder holds three things that must stay consistent: ``users.tsv``, ``items.tsv`` and ``images.lmdb``
(splits are not stored: leave-one-out is computed when a run reads the folder). The sample keeps ``users`` users
drawn without replacement by a generator seeded with ``seed`` (the same seed gives the same users), each with
the whole history in its original order; the items those histories touch, in ``items.tsv`` order; and the
images of exactly those items, copied byte for byte into a new image database. Users keep their file order.

Any other file of the source folder (``prepare_report.json``, ``import_report.json``) describes the source, not
the sample, so it is not copied; ``sample_report.json`` says what was kept, of how many, with which seed, and
lists what was left behind. Everything is built in a temporary folder beside ``out`` that replaces it only when
complete, so a failure leaves nothing. ``rest`` writes the users not drawn the same way, as a second domain: users
a model trained on the sample never saw, many more than the sample's own test users when the sample is small.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pmmrec.data.domain import IMAGES_DB, MAX_OFFENDERS, find_domain_files, read_domain, write_domain_tables
from pmmrec.data.image_db import ImageDB, write_image_db
from pmmrec.errors import PmmrecError
from pmmrec.utils.io import atomic_dir

log = logging.getLogger(__name__)

REPORT_FILE = "sample_report.json"


@dataclass
class SampleReport:
    """What ``sample_domain`` kept, out of what. Saved as ``sample_report.json`` in the sample."""

    source: str
    out: str
    seed: int
    users: int
    users_total: int
    items: int
    items_total: int
    interactions: int
    interactions_total: int
    images_stored: int | None = None  # None: the source has no image database to sample from
    items_without_image: list[str] = field(default_factory=list)  # kept items the source has no image for
    not_carried: list[str] = field(default_factory=list)  # other entries of the source folder, left behind
    rest: bool = False  # True: the users a sample (same source and seed) did not draw (``--rest``)
    rest_out: str | None = None  # the sample's --rest folder, and how many users it holds
    rest_users: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        what = "the rest:" if self.rest else "sampled"
        lines = [f"{what} {self.users:,} of {self.users_total:,} users (seed {self.seed}) from {self.source} "
                 f"-> {self.out}",
                 f"  items: {self.items:,} of {self.items_total:,}; interactions: {self.interactions:,} of "
                 f"{self.interactions_total:,}"]
        if self.images_stored is not None:
            missing = self.items_without_image
            example = f" (e.g. {', '.join(missing[:MAX_OFFENDERS])})" if missing else ""
            lines.append(f"  images: {self.images_stored:,} copied, {len(missing):,} items without one{example}")
        else:
            lines.append("  images: none (the source has no images.lmdb)")
        if self.not_carried:
            lines.append(f"  not carried (they describe the source): {', '.join(self.not_carried)}")
        if self.rest_out is not None:
            lines.append(f"  the {self.rest_users:,} users not drawn -> {self.rest_out}")
        return "\n".join(lines)


def choose_users(num_users: int, users: int, seed: int) -> np.ndarray:
    """Positions of ``users`` of ``num_users`` users drawn without replacement with ``seed``, ascending."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_users, size=users, replace=False))


def _check_users(users: int, source: Path, total: int | None = None) -> None:
    if isinstance(users, bool) or not isinstance(users, (int, np.integer)) or users < 1:
        raise PmmrecError(f"--users must be a positive number of users, got {users!r}")
    if total is not None and users > total:
        raise PmmrecError(f"--users {users} but {source} has {total} users; pass --users {total} or fewer")


def _check_out(source: Path, out: Path) -> None:
    """Refuse an ``out`` that is the source or holds it: replacing ``out`` would delete the source."""
    src, target = source.resolve(), out.resolve()
    if src == target or target in src.parents:
        raise PmmrecError(f"--out {out} is or contains the source domain {source}; choose another output folder")


def sample_domain(domain: str | os.PathLike, out: str | os.PathLike, users: int, seed: int = 0,
                  overwrite: bool = False, rest: str | os.PathLike | None = None) -> SampleReport:
    """Write a domain folder ``out`` holding ``users`` random users of ``domain`` and what they touch, atomically.

    Args:
        domain: a domain folder (our file names or the reference code's).
        out: the domain folder to create; an existing one is refused unless ``overwrite``.
        users: how many users to keep (1 to the domain's number of users).
        seed: seeds the draw: the same seed gives the same users, items and files.
        overwrite: replace an existing ``out`` (and ``rest``) (only once the new one is complete).
        rest: also write the users *not* drawn, and what they touch, as a domain folder there (its
            ``sample_report.json`` has ``rest: true``): users a model trained on the sample never saw, to evaluate
            it on (``pmmrec evaluate --checkpoint ... data.domain=REST``).
    """
    source, out = Path(domain), Path(out)
    _check_users(users, source)
    targets = [out] if rest is None else [out, Path(rest)]
    if len({t.resolve() for t in targets}) < len(targets):
        raise PmmrecError(f"--rest {rest} is the same folder as --out; choose another one")
    for target in targets:
        if target.exists() and not overwrite:  # before reading anything (atomic_dir checks again)
            raise PmmrecError(f"{target} already exists; pass --overwrite to replace it")
    files = find_domain_files(source)
    for target in targets:
        _check_out(source, target)
    # Titles are copied as they are, empty or not: whether an empty title is acceptable is the run's choice.
    full = read_domain(source, empty_title="blank", missing_image=None)
    _check_users(users, source, full.num_users)
    chosen = choose_users(full.num_users, users, seed)
    if rest is not None and users == full.num_users:
        raise PmmrecError(f"--users {users} keeps every user of {source}: no user is left for --rest {rest}")
    # Only our own image database holds encoded image files keyed by item id; the reference code's LMDB holds
    # pickled objects under other keys (pmmrec data import-reference converts it), so it is not copied.
    images = files.images if files.images is not None and files.images.name == IMAGES_DB else None
    if files.images is not None and images is None:
        log.warning("%s is the reference code's image LMDB (pickled images): not copied; convert the source with "
                    "pmmrec data import-reference to sample its images", files.images)
    not_carried = sorted(p.name for p in source.iterdir()
                         if p not in (files.items, files.users, images) and not p.name.startswith("."))
    extra = {}
    if rest is not None:
        others = np.setdiff1d(np.arange(full.num_users), chosen)
        _write_users(source, full, others, Path(rest), seed, overwrite, images, not_carried, {"rest": True})
        extra = {"rest_out": str(rest), "rest_users": len(others)}
    return _write_users(source, full, chosen, out, seed, overwrite, images, not_carried, extra)


def _write_users(source: Path, full, chosen: np.ndarray, out: Path, seed: int, overwrite: bool,
                 images: Path | None, not_carried: list[str], extra: dict) -> SampleReport:
    """The domain folder ``out`` of the users at positions ``chosen`` of ``full`` (read from ``source``), the
    items they touch and those items' images, with its ``sample_report.json``; atomically."""
    sequences = [full.sequences[u] for u in chosen]
    touched = np.zeros(full.num_items + 1, dtype=bool)
    touched[np.concatenate(sequences)] = True
    kept = np.flatnonzero(touched[1:])  # item positions (0-based), in items.tsv order
    if not len(kept):
        raise PmmrecError(f"{source}: the {len(chosen)} users drawn with seed {seed} have no interactions")
    item_ids = [full.item_ids[k] for k in kept]
    report = SampleReport(
        source=str(source), out=str(out), seed=int(seed), users=len(chosen), users_total=full.num_users,
        items=len(kept), items_total=full.num_items, interactions=int(sum(len(s) for s in sequences)),
        interactions_total=full.num_interactions, not_carried=list(not_carried), **extra)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_domain_tables(tmp, item_ids, [full.titles[k] for k in kept], [full.user_ids[u] for u in chosen],
                            [[full.item_ids[i - 1] for i in seq] for seq in sequences])
        if images is not None:
            report.images_stored = write_image_db(tmp / IMAGES_DB, _images_of(images, item_ids, report))
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    return report


def _images_of(path: Path, item_ids: list[str], report: SampleReport) -> Iterator[tuple[str, bytes]]:
    """The stored bytes of each item's image, in item order; items without one are listed in ``report``."""
    db = ImageDB(path)
    try:
        for iid in item_ids:
            data = db.get(iid)
            if data is None:
                report.items_without_image.append(iid)
            else:
                yield iid, data
    finally:
        db.close()
