"""`pmmrec demo --quick` end to end (what `make demo` runs, on the tiny world)."""

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
    assert "target item features: 96 items" in report and "all present: True" in report
    config = load_config(out / "config.yaml")
    assert config.data.domain.endswith("world/target") and len(config.data.sources) == 3
