"""Shared test fixtures: paths to the repository, configs and (when present) ../shared/datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def movielens() -> Path:
    """The real MovieLens-1M files; tests using them skip when ../shared/datasets is absent."""
    path = SHARED_DATASETS / "movielens-1m"
    if not (path / "ratings.csv").is_file():
        pytest.skip(f"shared dataset absent: {path} (only the developers' machines have it)")
    return path
