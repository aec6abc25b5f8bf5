"""scripts/studies.py: a run folder's wall time is kept on disk while the run goes, and summed over sessions."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import studies  # noqa: E402


def test_wall_seconds_is_written_while_the_run_goes_and_summed_over_sessions(tmp_path, monkeypatch):
    folder, seen = tmp_path / "run", []
    monkeypatch.setattr(studies, "TICK", 0.05)

    def interrupted(*args, threads):
        time.sleep(0.3)
        seen.append(float((folder / "wall_seconds").read_text()))  # written before the run ends
        (folder / "checkpoints").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(studies, "pmmrec", interrupted)
    with contextlib.suppress(KeyboardInterrupt):
        studies.run_folder(folder, ["train", f"run.dir={folder}"], threads=1)
    first = float((folder / "wall_seconds").read_text())
    assert 0.1 <= seen[0] <= first and first >= 0.3

    def finishes(*args, threads):
        assert args[-1] == "--resume"  # checkpoints from the first session
        (folder / "results.json").write_text(json.dumps({"test": {}}))

    monkeypatch.setattr(studies, "pmmrec", finishes)
    out = studies.run_folder(folder, ["train", f"run.dir={folder}"], threads=1)
    assert first <= out["wall_seconds"] < first + 0.3


def test_run_all_keeps_the_order_runs_jobs_at_once_and_stops_starting_tasks_after_a_failure():
    lock, running, peak, started = threading.Lock(), [0], [0], []

    def task(i, seconds=0.05, fail=False):
        def go():
            with lock:
                started.append(i)
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            time.sleep(seconds)
            with lock:
                running[0] -= 1
            if fail:
                raise RuntimeError(f"task {i} failed")
            return i * 10
        return go

    assert studies.run_all([task(i, 0.05 * (5 - i)) for i in range(5)], jobs=2) == [0, 10, 20, 30, 40]
    assert peak[0] == 2
    peak[0], started[:] = 0, []
    assert studies.run_all([task(i) for i in range(3)], jobs=1) == [0, 10, 20] and peak[0] == 1
    started[:] = []
    with pytest.raises(RuntimeError, match="task 0 failed"):
        studies.run_all([task(0, 0.05, fail=True)] + [task(i, 0.2) for i in range(1, 8)], jobs=2)
    assert 0 in started and len(started) < 8  # the tasks not started when it failed were cancelled
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        studies.run_all([task(0)], jobs=0)


def test_transfer_study_transfers_the_parts_asked_for_and_routes_each_override_set(monkeypatch):
    import transfer_study  # scripts/ is on the path (above)

    study = transfer_study.Study(Path("out"), Path("recipe.yaml"), extra=["a=1"], target_extra=["t=1"],
                                 pretrain_extra=["p=1"], parts=("full",))
    names = transfer_study.variants(study, {"rec": Path("r.pt"), "rec,nicl": Path("n.pt")}, "rec")
    assert set(names) == {"pop", "scratch", "transfer-full-rec", "zero-shot-rec", "transfer-full-rec+nicl",
                          "zero-shot-rec+nicl"}
    study.parts = transfer_study.PARTS
    assert {"transfer-item_encoder-rec", "transfer-user_encoder-rec"} <= set(
        transfer_study.variants(study, {"rec": Path("r.pt")}, "rec"))
    seen = []
    monkeypatch.setattr(transfer_study, "run_folder", lambda folder, words, threads, resumable: seen.append(words))
    study.run(Path("f"), ["train"], target=True)
    study.run(Path("f"), ["pretrain"], pretraining=True)
    study.run(Path("f"), ["evaluate"])
    assert [w[2:] for w in seen] == [["a=1", "t=1"], ["a=1", "p=1"], ["a=1"]]


def test_zero_shot_prior_pairs_two_rankings_user_by_user():
    import torch
    from zero_shot_prior import paired_difference

    # NDCG@10 per user: [1, 0, 0] against [1/log2(3), 1, 0] (rank -1: not ranked; 12: beyond k)
    out = paired_difference(torch.tensor([0, -1, 12]), torch.tensor([1, 0, 12]))
    assert out["users"] == 3 and out["metric"] == "NDCG@10"
    assert out["mean"] == pytest.approx((1 - 1 / 1.584962500721156 - 1) / 3)
    assert out["ci95"][0] <= out["mean"] <= out["ci95"][1]
    same = paired_difference(torch.tensor([3, 4]), torch.tensor([3, 4]))
    assert same["mean"] == 0 and same["ci95"] == [0, 0]
