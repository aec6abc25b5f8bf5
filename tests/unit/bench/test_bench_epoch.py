"""`pmmrec bench epoch` in quick mode (the built-in world, tiny encoders) and its bad input."""

import json
from types import SimpleNamespace

import pytest

from pmmrec.bench import epoch
from pmmrec.errors import PmmrecError


def test_bench_epoch_quick_times_both_variants(tmp_path):
    out = tmp_path / "e.json"
    result = epoch.run(SimpleNamespace(out=str(out), quick=True))
    assert json.loads(out.read_text()) == result
    assert set(result["variants"]) == {"sasrec", "multimodal"}
    for r in result["variants"].values():
        assert r["steps"] == 3 and r["targets"] > 0 and r["epoch_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["windows"] >= r["steps"] and r["num_items"] == 96


def test_bench_epoch_needs_a_domain(tmp_path):
    with pytest.raises(PmmrecError, match="needs --domain"):
        epoch.run(SimpleNamespace(out=str(tmp_path / "e.json"), quick=False, domain=None))
