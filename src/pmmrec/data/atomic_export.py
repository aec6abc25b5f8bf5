"""``pmmrec data export-atomic``: a domain's exact leave-one-out split as RecBole benchmark files.

One training row per position of the training part, one validation row and one test row per user
(``user_id:token item_id_list:token_seq item_id:token``), histories cut to ``max_seq_len`` exactly as pmmrec's user
encoder sees them; plus ``<name>.item`` (titles, optionally image files), a RecBole config (``<name>.yaml``) and a
split manifest (``<name>.split.json``, with a SHA-256 per file). :func:`pmmrec.data.atomic.import_atomic` turns
the folder back into a domain with the identical split (see :mod:`pmmrec.data.atomic` for the format).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from pmmrec import __version__
from pmmrec.data.atomic import BENCHMARK_HEADER, IMAGE_FOLDER, SAFE_NAME, SPLITS, sha256_file
from pmmrec.data.domain import read_domain
from pmmrec.data.split import SplitData, leave_one_out
from pmmrec.errors import DataError, PmmrecError
from pmmrec.utils.io import atomic_dir

log = logging.getLogger(__name__)

_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}
# Cells that pandas (RecBole's reader) turns into missing values by default: such ids would be silently lost.
PANDAS_MISSING = frozenset({"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                            "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"})




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
                  max_seq_len: int = 20, min_seq_len: int = 3, history: str = "all", images: bool = False,
                  overwrite: bool = False) -> AtomicExportReport:
    """Write the leave-one-out split of the domain at ``domain_dir`` as RecBole benchmark files in ``out``.

    The split is pmmrec's, with these ``max_seq_len`` / ``min_seq_len`` / ``history`` (use the run's ``data.*``
    values).
    ``images``: also copy each item's image file into ``out/images/`` and name it in the ``.item`` file.
    """
    out = Path(out)
    name = name or out.name
    if not SAFE_NAME.fullmatch(name):
        raise PmmrecError(f"dataset name {name!r}: use letters, digits, '.', '_' and '-' (RecBole's file names)")
    if out.resolve() == Path(domain_dir).resolve() or out.resolve() in Path(domain_dir).resolve().parents:
        raise PmmrecError(f"--out {out} contains the domain {domain_dir}; choose another output folder")
    domain = read_domain(domain_dir, empty_title="blank")
    split = leave_one_out(domain, max_seq_len, min_seq_len, history)
    for field, values in (("user_id", split.user_ids), ("item_id", split.item_ids)):
        for value in values:
            if value.split() != [value]:
                raise DataError(f"{field.split('_')[0]} id {value!r} contains whitespace, which a RecBole token "
                                "cannot hold", domain.path, field=field)
            if value in PANDAS_MISSING or '"' in value:
                raise DataError(f"{field.split('_')[0]} id {value!r} would not survive RecBole's reader (pandas "
                                "reads it as a missing value or a quote); rename it before exporting",
                                domain.path, field=field)
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
        manifest = _manifest(tmp, name, domain_dir, split, max_seq_len, min_seq_len, rows, history)
        (tmp / f"{name}.split.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (tmp / f"{name}.yaml").write_text(_recbole_config(max_seq_len, images), encoding="utf-8")
    report = AtomicExportReport(str(out), name, split.num_users, split.num_items, rows, split.num_dropped_users,
                                stored)
    log.info("%s", report.summary())
    return report


def _export_items(folder: Path, name: str, split: SplitData, images: bool) -> int | None:
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
                stem = iid if SAFE_NAME.fullmatch(iid) else f"item{k + 1}"
                paths[k] = f"{IMAGE_FOLDER}/{stem}.{_extension(data)}"
                (folder / paths[k]).write_bytes(data)
                stored += 1
        finally:
            for db in dbs.values():
                db.close()
    with open(folder / f"{name}.item", "w", encoding="utf-8") as f:
        f.write("item_id:token\ttitle:token_seq" + ("\timage:token\n" if images else "\n"))
        for k, (iid, title) in enumerate(zip(split.item_ids, split.titles, strict=True)):
            # RecBole reads these files with pandas, for which a field starting with '"' is quoted: a title
            # like "Great Performances" Cats (1998) would break the file, so double quotes become single ones.
            title = " ".join(title.split()).replace('"', "'")
            f.write(f"{iid}\t{title}" + (f"\t{paths[k]}\n" if images else "\n"))
    return stored


def _extension(data: bytes) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return _EXTENSIONS.get(image.format or "", "img")
    except Exception:  # Pillow raises many types; an undecodable image keeps its bytes under a neutral name
        return "img"


def _manifest(folder: Path, name: str, domain_dir: str | os.PathLike, split: SplitData, max_seq_len: int, min_seq_len: int,
              rows: dict[str, int], history: str = "all") -> dict:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return {
        "format": "pmmrec-atomic-split", "version": 1, "pmmrec_version": __version__,
        "source_domain": str(domain_dir), "name": name,
        "split": {"method": "leave-one-out (pmmrec.data.split.leave_one_out)", "max_seq_len": max_seq_len,
                  "min_seq_len": min_seq_len, "history": history,
                  "kept_per_user": max_seq_len + 3 if history == "reference" else "all"},
        "users": split.num_users, "items": split.num_items, "dropped_users": split.num_dropped_users,
        "rows": rows,
        "targets": {"train": "every item of seq[:-2] after the first", "valid": "seq[-2]", "test": "seq[-1]"},
        "protocols": {"include_history": "what RecBole's full-sort evaluation of sequential models computes",
                      "exclude_history": "pmmrec's paper protocol: every item the user interacted with before the "
                                         "target (in the kept history) is removed from the ranking"},
        "files": {p.name: sha256_file(p) for p in files},
    }


def _recbole_config(max_seq_len: int, images: bool) -> str:
    config = {
        "benchmark_filename": list(SPLITS),
        "alias_of_item_id": ["item_id_list"],
        # The .item file too, so RecBole ranks every item pmmrec ranks (with data.history: all, items seen only by
        # dropped short users are in the catalogue but in no .inter row).
        "load_col": {"inter": ["user_id", "item_id_list", "item_id"], "item": ["item_id"]},
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
