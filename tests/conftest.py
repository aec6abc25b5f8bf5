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


def png_bytes(color: tuple[int, int, int], size: int = 16, fmt: str = "PNG") -> bytes:
    """A small solid-colour image, encoded."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def tiny_domain(tmp_path) -> Path:
    """A 6-item, 4-user domain folder with titles and an image LMDB (item i6 has no image)."""
    from pmmrec.data.domain import write_domain_tables
    from pmmrec.data.image_db import write_image_db

    root = tmp_path / "tiny"
    root.mkdir()
    ids = [f"i{k}" for k in range(1, 7)]
    titles = ["Red Apple Pie", "green tea", "A much longer title about blue oceans and ships", "x", "Yellow sun",
              "no image here"]
    users = [["i1", "i2", "i3"], ["i2", "i3", "i4", "i5"], ["i5", "i1", "i2", "i6"], ["i3", "i4", "i1"]]
    write_domain_tables(root, ids, titles, ["u1", "u2", "u3", "u4"], users)
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0), (255, 255, 0)]
    write_image_db(root / "images.lmdb", [(iid, png_bytes(c)) for iid, c in zip(ids[:5], colors, strict=True)])
    return root


@pytest.fixture(scope="session")
def quick_world(tmp_path_factory) -> Path:
    """The built-in world in quick mode (4 small domains with images), generated once per test session."""
    from pmmrec.data.synth import SynthConfig, synthesize_world

    out = tmp_path_factory.mktemp("world") / "world"
    synthesize_world(out, SynthConfig(seed=0, quick=True))
    return out


# Shared CI machines are slow and noisy: no per-example deadline and no "too slow" health check, so a loaded
# machine cannot turn a property test red. The properties themselves are unchanged.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("pmmrec", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pmmrec")
