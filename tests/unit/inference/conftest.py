"""Fixtures shared by the recommender's tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def copy_checkpoint(source: Path, tmp_path: Path) -> Path:
    """``source`` copied into this test's folder, so that its default vector store (beside it) is the test's own."""
    path = tmp_path / "ck" / "last.pt"
    path.parent.mkdir()
    shutil.copy(source, path)
    return path


@pytest.fixture
def domain(quick_world, tmp_path) -> Path:
    """A copy of the quick world's target domain that a test may change."""
    return Path(shutil.copytree(quick_world / "target", tmp_path / "target"))
