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
    saved = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in saved["rows"]}
    assert set(rows) == {"most popular", "PMMRec multimodal, scratch", "SASRec (item IDs), scratch",
                         "transfer full, multimodal", "transfer item encoder, multimodal",
                         "transfer user encoder, multimodal", "transfer full, text only", "transfer full, vision only",
                         "pretrained with rec", "pretrained with rec + NICL", "pretrained with all four (PMMRec)"}
    for row in rows.values():
        assert 0.0 <= row["NDCG@10"] <= row["HR@10"] <= 1.0 and row["name"] in report
    scratch = rows["PMMRec multimodal, scratch"]["NDCG@10"]
    full = rows["transfer full, multimodal"]
    assert full["gain_vs_scratch"] == pytest.approx((full["NDCG@10"] - scratch) / scratch)
    assert rows["pretrained with all four (PMMRec)"]["NDCG@10"] == full["NDCG@10"]
    assert [p["objectives"] for p in saved["pretraining"]] == [["rec", "nicl", "nid", "rcl"], ["rec"], ["rec", "nicl"]]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = out / "runs"
    config = load_config(runs / "scratch" / "config.yaml")
    assert config.data.domain.endswith("world/target") and len(config.data.sources) == 3
    assert config.text.trainable_layers == 0 and (runs / "scratch-ids" / "results.json").is_file()
    pretrained = load_config(runs / "pretrain-all" / "config.yaml")
    assert pretrained.objectives.use == ["rec", "nicl", "nid", "rcl"]
    transfer = load_config(runs / "transfer-text" / "config.yaml")
    assert transfer.model.modality == "text" and transfer.transfer.checkpoint.endswith("pretrain-all/checkpoints/best.pt")
    assert json.loads((runs / "transfer-user" / "transfer.json").read_text())["loaded"]
    # One feature cache serves every run; checkpoints leave the frozen pretrained encoders out.
    assert (out / "cache").is_dir() and not (runs / "scratch" / "cache").exists()
    assert (runs / "transfer-full" / "checkpoints" / "best.pt").stat().st_size < 5_000_000


@pytest.mark.slow
def test_quick_demo_without_the_ablation(tmp_path):
    """`--no-ablation`: one pretraining (all four objectives), no ablation rows or runs, the rest unchanged."""
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "pmmrec", "demo", "--out", str(out), "--quick", "--no-ablation"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    saved = json.loads((out / "report.json").read_text())
    names = {r["name"] for r in saved["rows"]}
    assert "transfer full, multimodal" in names and "PMMRec multimodal, scratch" in names
    assert not names & {"pretrained with rec", "pretrained with rec + NICL", "pretrained with all four (PMMRec)"}
    assert [p["objectives"] for p in saved["pretraining"]] == [["rec", "nicl", "nid", "rcl"]]
    runs = out / "runs"
    assert (runs / "pretrain-all").is_dir() and not (runs / "pretrain-rec").exists()
    assert not any(p.name.startswith("ablation") for p in runs.iterdir())
    assert "ablation" not in (out / "report.md").read_text()
