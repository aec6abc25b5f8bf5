"""`pmmrec bench start --quick`: the JSON contract (cold and warm time to the first answer of a real `pmmrec serve`
process, with each start's breakdown), and the helpers it is built from."""

import json

import pytest

from pmmrec.bench import start
from pmmrec.cli import main


@pytest.mark.slow  # four `pmmrec serve` processes, each importing torch: about 25 s
def test_bench_start_quick_times_a_cold_start_and_restarts(tmp_path):
    out = tmp_path / "start.json"
    assert main(["bench", "start", "--quick", "--out", str(out), "--work", str(tmp_path / "work")]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "start" and result["quick"] is True and result["items"] == 120
    cold, warm = result["cold"], result["warm"]
    assert cold["items"] == 120 and "cold_extrapolated" not in result  # measured, not extrapolated
    assert cold["vectors"]["encoded"] == 120 and cold["vectors"]["reused"] == 0
    assert warm["store"] == "written by the cold start" and len(warm["runs"]) == 2
    for run in [cold, *warm["runs"]]:
        parts = run["before_loading"] + run["loading"] + run["app_and_uvicorn"] + run["first_answer"]
        assert abs(parts - run["seconds"]) < 0.01 and run["loading"] > 0 and run["first_answer"] >= 0
    # The cold start recorded the catalogue: every restart is the quick one (no item encoder, nothing hashed).
    assert all("vectors" not in run and "key" not in run["loading_phases"] for run in warm["runs"])
    assert warm["seconds"] == warm["runs"][1]["seconds"] and result["meets_target"] == (warm["seconds"] <= 5.0)
    changed = result["changed"]
    assert changed["vectors"]["encoded"] == 1 and changed["vectors"]["reused"] == 119
    assert "key" in changed["loading_phases"]  # the full path
    # The work folder keeps the catalogue and the checkpoint for the next run.
    catalogue = tmp_path / "work" / "catalogue-120-32px"
    assert "bench start changed" not in (catalogue / "items.tsv").read_text()  # the title was put back
    assert (tmp_path / "work" / "checkpoint-tiny.pt").is_file()


def test_the_breakdown_is_read_from_the_log_lines():
    lines = start._Lines(iter(()), 0.0)
    lines.lines = [(2.0, "12:00:00 INFO x: catalogue vectors: 0 reused, 8 encoded in 0.500s, 16 items/s; store /s "
                          "(x): written (digests 0.100s, store read 0.000s, encode 0.350s, assemble and write 0.050s)"),
                   (2.5, "12:00:00 INFO x: recommender: ready in 1.500s (checkpoint 0.200s, model 0.700s, "
                          "vectors 0.500s)"),
                   (3.0, "INFO:     Application startup complete.")]
    out = start._breakdown(lines, 3.25)
    assert out["before_loading"] == 1.0 and out["loading"] == 1.5 and out["app_and_uvicorn"] == 0.5
    assert out["first_answer"] == 0.25
    assert out["loading_phases"] == {"checkpoint": 0.2, "model": 0.7, "vectors": 0.5}
    assert out["vectors"]["encoded"] == 8 and out["vectors"]["phases"]["encode"] == 0.35


def test_bench_start_refuses_sizes_too_small(tmp_path):
    assert main(["bench", "start", "--items", "2", "--out", str(tmp_path / "x.json")]) == 2
