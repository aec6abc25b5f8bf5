"""A *domain*: items (id, title, image) and users' chronological interactions (docs/design.md §3).

On disk a domain is a folder::

    <domain>/items.tsv     item_id<TAB>title          (UTF-8, header optional)
    <domain>/users.tsv     user_id<TAB>item item ...  (chronological, space-separated)
    <domain>/images.lmdb/  key = item_id (UTF-8), value = encoded image bytes

The reference code's names (``<name>_items_texts.tsv``, ``<name>_users.tsv``, ``<name>_items_images.lmdb``) are
read as they are. In memory, items are numbered 1..N in file order (0 is padding) and sequences hold those
numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from pmmrec.errors import DataError
from pmmrec.utils.io import atomic_dir, atomic_file

ITEMS_FILE, USERS_FILE, IMAGES_DB = "items.tsv", "users.tsv", "images.lmdb"
_ITEM_HEADERS = {("item_id", "title"), ("item", "title")}
_USER_HEADERS = {("user_id", "item_ids"), ("user_id", "items"), ("user", "items")}
MAX_OFFENDERS = 5  # how many bad lines an error lists before "and N more"


@dataclass
class Domain:
    """Items and user sequences of one domain. Item ``i`` (1-based) is ``item_ids[i - 1]``; 0 is padding."""

    name: str
    item_ids: list[str]
    titles: list[str]
    user_ids: list[str]
    sequences: list[np.ndarray]  # one int64 array of item numbers per user, oldest first
    image_db: Path | None = None  # images.lmdb folder, if the domain has one
    path: Path | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # what reading dropped, and why
    # Per item (image LMDB folder or None, key inside it), for catalogues merged from several domains
    # (merge_domains); None means every item's image is ``image_db[item_id]``.
    image_sources: list[tuple[Path | None, str]] | None = None

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def image_refs(self) -> list[tuple[Path | None, str]]:
        """Where each item's image lives: (image LMDB folder or None, key inside it), in item order."""
        if self.image_sources is not None:
            return list(self.image_sources)
        return [(self.image_db, iid) for iid in self.item_ids]

    def item_index(self) -> dict[str, int]:
        """Raw item id -> item number (1-based)."""
        return {iid: i + 1 for i, iid in enumerate(self.item_ids)}


@dataclass(frozen=True)
class DomainFiles:
    items: Path
    users: Path
    images: Path | None


def find_domain_files(path: str | os.PathLike) -> DomainFiles:
    """Locate the items/users/images files of a domain folder, in our naming or the reference code's."""
    path = Path(path)
    if not path.is_dir():
        raise DataError("domain folder not found", path)
    if (path / ITEMS_FILE).is_file() and (path / USERS_FILE).is_file():
        images = path / IMAGES_DB
        return DomainFiles(path / ITEMS_FILE, path / USERS_FILE, images if images.is_dir() else None)
    texts = sorted(path.glob("*_items_texts.tsv"))
    if len(texts) == 1:
        name = texts[0].name[: -len("_items_texts.tsv")]
        users = path / f"{name}_users.tsv"
        if users.is_file():
            images = path / f"{name}_items_images.lmdb"
            return DomainFiles(texts[0], users, images if images.is_dir() else None)
    raise DataError(f"not a domain folder: expected {ITEMS_FILE} and {USERS_FILE} "
                    "(or the reference code's <name>_items_texts.tsv and <name>_users.tsv)", path)


def _read_lines(path: Path):
    """Yield (line number, line without newline); invalid UTF-8 is an error naming the line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"invalid UTF-8 at byte {e.start}", path, number) from None
            if number == 1 and line.startswith("\ufeff"):  # byte-order mark written by some editors
                line = line[1:]
            yield number, line.rstrip("\r\n")


def _is_header(line: str, headers: set[tuple[str, str]]) -> bool:
    parts = tuple(p.strip().lower() for p in line.split("\t"))
    return parts in headers


def read_items(path: Path, empty_title: Literal["error", "blank"] = "error") -> tuple[list[str], list[str]]:
    """Read ``item_id<TAB>title`` lines. Duplicate ids and (by default) empty titles are errors."""
    ids: list[str] = []
    titles: list[str] = []
    seen: dict[str, int] = {}
    for number, line in _read_lines(path):
        if not line.strip() or (number == 1 and _is_header(line, _ITEM_HEADERS)):
            continue
        parts = line.split("\t", 1)
        item_id = parts[0].strip()
        if not item_id:
            raise DataError("empty item id", path, number, "item_id")
        if len(parts) < 2:
            raise DataError(f"missing column: expected item_id<TAB>title, got {line[:60]!r}", path, number, "title")
        title = parts[1].strip()
        if not title and empty_title == "error":
            raise DataError(f"empty title for item {item_id!r} (set data.empty_title: blank to allow)",
                            path, number, "title")
        if item_id in seen:
            raise DataError(f"duplicate item id {item_id!r} (first on line {seen[item_id]})", path, number, "item_id")
        seen[item_id] = number
        ids.append(item_id)
        titles.append(title)
    if not ids:
        raise DataError("no items", path)
    return ids, titles


def read_users(path: Path, item_index: dict[str, int]) -> tuple[list[str], list[np.ndarray]]:
    """Read ``user_id<TAB>item item ...`` lines; every item must be known (else list the first offenders)."""
    users: list[str] = []
    seqs: list[np.ndarray] = []
    unknown: list[str] = []
    n_unknown = 0
    seen: dict[str, int] = {}
    for number, line in _read_lines(path):
        if not line.strip() or (number == 1 and _is_header(line, _USER_HEADERS)):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise DataError(f"expected user_id<TAB>items, got {len(parts)} column(s)", path, number)
        user_id, items = parts[0].strip(), parts[1].split()
        if not user_id:
            raise DataError("empty user id", path, number, "user_id")
        if user_id in seen:
            raise DataError(f"duplicate user id {user_id!r} (first on line {seen[user_id]})", path, number, "user_id")
        seen[user_id] = number
        seq = np.empty(len(items), dtype=np.int64)
        for k, item in enumerate(items):
            index = item_index.get(item)
            if index is None:
                n_unknown += 1
                if len(unknown) < MAX_OFFENDERS:
                    unknown.append(f"line {number}: {item!r}")
                index = 0
            seq[k] = index
        users.append(user_id)
        seqs.append(seq)
    if n_unknown:
        more = f" and {n_unknown - len(unknown)} more" if n_unknown > len(unknown) else ""
        raise DataError(f"items not in the items file: {', '.join(unknown)}{more}", path, field="items")
    if not users:
        raise DataError("no users", path)
    return users, seqs


def read_domain(path: str | os.PathLike, empty_title: Literal["error", "blank"] = "error",
                missing_image: Literal["error", "blank"] | None = None, name: str | None = None) -> Domain:
    """Read and validate a domain folder.

    ``missing_image`` (``data.missing_image``) checks the image database: ``error`` fails listing items with
    no image, ``blank`` allows them, ``None`` skips the check (text-only use).
    """
    files = find_domain_files(path)
    item_ids, titles = read_items(files.items, empty_title)
    index = {iid: i + 1 for i, iid in enumerate(item_ids)}
    user_ids, seqs = read_users(files.users, index)
    domain = Domain(name or Path(path).resolve().name, item_ids, titles, user_ids, seqs,
                    image_db=files.images, path=Path(path))
    if missing_image is not None:
        check_images(domain, missing_image)
    return domain


def items_without_image(domain: Domain) -> list[str]:
    from pmmrec.data.image_db import image_keys

    refs = domain.image_refs()
    keys = {db: image_keys(db) for db in {db for db, _ in refs if db is not None}}
    return [iid for iid, (db, key) in zip(domain.item_ids, refs, strict=True) if db is None or key not in keys[db]]


def check_images(domain: Domain, missing_image: Literal["error", "blank"]) -> list[str]:
    """Return the items with no image; under ``missing_image: error`` any such item is an error."""
    missing = items_without_image(domain)
    if missing and missing_image == "error":
        # Only a run whose model reads images checks them (read_domain's missing_image), so say so: evaluating
        # or serving a vision checkpoint on another domain's catalogue is where this is met first.
        more = f" and {len(missing) - MAX_OFFENDERS} more" if len(missing) > MAX_OFFENDERS else ""
        examples = f"{', '.join(map(repr, missing[:MAX_OFFENDERS]))}{more}"
        hint = ("the model reads images (model.modality vision or multimodal); set data.missing_image: blank to "
                "give these items a blank image")
        if domain.image_db is None and domain.image_sources is None:
            raise DataError(f"no image database ({IMAGES_DB}), so none of its {domain.num_items} items has an "
                            f"image ({examples}); {hint}, or add one with pmmrec data build-images",
                            domain.path or "the merged source domains")
        raise DataError(f"{len(missing)} of {domain.num_items} items have no image: {examples}; {hint}",
                        domain.image_db or domain.path or "the merged source domains")
    return missing


def write_domain_tables(out: Path, item_ids: list[str], titles: list[str], user_ids: list[str],
                        sequences: list[list[str]] | list[np.ndarray], numbered: bool = False) -> None:
    """Write items.tsv and users.tsv into ``out`` (each atomically). Tabs/newlines in titles become spaces.

    ``sequences`` hold raw item ids, or item numbers (1-based) when ``numbered`` is set.
    """
    with atomic_file(out / ITEMS_FILE) as f:
        f.write("item_id\ttitle\n")
        for iid, title in zip(item_ids, titles, strict=True):
            f.write(f"{iid}\t{' '.join(title.split())}\n")
    with atomic_file(out / USERS_FILE) as f:
        f.write("user_id\titem_ids\n")
        for uid, seq in zip(user_ids, sequences, strict=True):
            items = (item_ids[int(i) - 1] for i in seq) if numbered else seq
            f.write(f"{uid}\t{' '.join(items)}\n")


def write_domain(domain: Domain, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a domain's tables into a new folder, atomically (the image database is not copied)."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_domain_tables(tmp, domain.item_ids, domain.titles, domain.user_ids, domain.sequences, numbered=True)
    return Path(out)
