"""`pmmrec demo --quick` end to end (what `make demo` runs, on the tiny world)."""

import json
import subprocess
import sys

import pytest

from pmmrec.config import load_config


@pytest.mark.slow
def test_quick_demo_writes_report_and_resolved_config(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "pmmrec", "demo", "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    for domain in ("books", "films", "games", "target"):
        assert f"## {domain}" in report
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert set(rows) == {"Most popular", "PMMRec multimodal, scratch", "SASRec (item IDs), scratch"}
    for row in rows.values():
        assert 0.0 <= row["NDCG@10"] <= row["HR@10"] <= 1.0 and row["name"] in report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = load_config(out / "runs" / "pmmrec" / "config.yaml")
    assert config.data.domain.endswith("world/target") and len(config.data.sources) == 3
    assert config.text.trainable_layers == 0 and (out / "runs" / "sasrec" / "results.json").is_file()
