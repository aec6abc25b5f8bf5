"""Fixtures shared by the recommender's tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import lmdb
import pytest
import torch


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    """``source`` copied into this test's folder, so that its default vector store (beside it) is the test's own."""
    path = tmp_path / "ck" / "last.pt"
    path.parent.mkdir()
    shutil.copy(source, path)
    return path


def vectors_of(rec) -> torch.Tensor:
    """A recommender's catalogue vectors (row 0 the padding), copied."""
    return rec.catalogue.snapshot().vectors.clone()


def set_title(domain: Path, item_id: str, title: str) -> None:
    """Give one item of ``domain`` another title in its items.tsv."""
    lines = (domain / "items.tsv").read_text().splitlines()
    lines = [f"{item_id}\t{title}" if line.split("\t")[0] == item_id else line for line in lines]
    (domain / "items.tsv").write_text("\n".join(lines) + "\n")


def set_image(domain: Path, item_id: str, data: bytes) -> None:
    """Put ``data`` as the image of ``item_id`` in ``domain``'s images.lmdb."""
    env = lmdb.open(str(domain / "images.lmdb"), subdir=True, lock=True, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(item_id.encode(), data)
    env.close()


@pytest.fixture
def domain(quick_world, tmp_path) -> Path:
    """A copy of the quick world's target domain that a test may change."""
    return Path(shutil.copytree(quick_world / "target", tmp_path / "target"))
