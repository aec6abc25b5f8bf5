"""Write items added to a recommender into its domain folder, so a restart (or a later training run) has them.

Images go first, into the domain's image LMDB (one write transaction: all or nothing); then ``items.tsv`` is
rewritten with the new lines appended (a temporary file renamed into place). A crash between the two leaves
at worst images that no item names, which nothing reads; never an item line without its image.

Persisting is idempotent: an id that ``items.tsv`` already lists has its line replaced, not repeated. A call that
wrote the domain and then failed later (the vector store could not be written, say) can be retried without
leaving a duplicate id behind, which would make the domain unreadable at the next start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lmdb

from pmmrec.data.domain import IMAGES_DB, find_domain_files
from pmmrec.data.image_db import MAP_SIZE
from pmmrec.errors import PmmrecError
from pmmrec.utils.io import atomic_write_bytes


def persist_items(domain: str | Path, items: Sequence[tuple[str, str, bytes | None]]) -> None:
    """Append ``(item_id, title, image bytes or None)`` to the domain folder ``domain``, atomically per file."""
    files = find_domain_files(domain)
    images = [(iid, data) for iid, _, data in items if data is not None]
    if images:
        db = files.images or _images_path(Path(domain), files.items)
        try:
            env = lmdb.open(str(db), map_size=MAP_SIZE, subdir=True, lock=True)
        except lmdb.Error as e:
            raise PmmrecError(f"{db}: cannot open the image database for writing ({e})") from None
        try:
            with env.begin(write=True) as txn:
                for iid, data in images:
                    txn.put(iid.encode("utf-8"), data)
            env.sync()
        finally:
            env.close()
    # Titles are one line and one field: tabs and newlines become spaces (as write_domain_tables does).
    lines = {iid: f"{iid}\t{' '.join(title.split())}\n".encode() for iid, title, _ in items}
    kept = []
    for line in files.items.read_bytes().splitlines(keepends=True):
        iid = line.split(b"\t", 1)[0].strip().decode("utf-8", errors="replace")
        kept.append(lines.pop(iid) if iid in lines else line if line.endswith(b"\n") else line + b"\n")
    atomic_write_bytes(files.items, b"".join(kept) + b"".join(lines.values()))


def _images_path(domain: Path, items_file: Path) -> Path:
    """Where a domain without images gets its image LMDB (the reference code's name for its naming)."""
    suffix = "_items_texts.tsv"
    if items_file.name.endswith(suffix):
        return domain / f"{items_file.name[: -len(suffix)]}_items_images.lmdb"
    return domain / IMAGES_DB
