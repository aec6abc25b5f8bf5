"""scripts/transfer_study.py end to end on a tiny MovieLens-shaped folder with genres (the tiny recipe, a step or
two per run): genre domains, pretraining, target samples, every variant, the curve and the gains table."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
GENRES = ["Animation", "Action", "Comedy", "Drama"]


def _movielens_with_genres(root: Path) -> Path:
    """24 movies, six per genre group, all with posters; 12 users with 4 ratings in every genre."""
    (root / "posters").mkdir(parents=True)
    movies = ["movie_id,title,genres"] + [f"{m},Movie {m} ({1990 + m}),{GENRES[m % 4]}" for m in range(1, 25)]
    (root / "movies.csv").write_text("\n".join(movies) + "\n")
    rows, t = ["user_id,movie_id,rating,timestamp"], 0
    for u in range(1, 13):
        for k in range(16):
            t += 1
            rows.append(f"{u},{(u * 5 + k * 7) % 24 + 1},4,{t}")
    (root / "ratings.csv").write_text("\n".join(rows) + "\n")
    for m in range(1, 25):
        buf = io.BytesIO()
        Image.new("RGB", (12, 18), (10 * m, 40 * (m % 4), 90)).save(buf, format="PNG")
        (root / "posters" / f"{m}.png").write_bytes(buf.getvalue())
    return root


def test_the_study_runs_every_variant_and_writes_the_curve_and_the_gains(tmp_path):
    data = _movielens_with_genres(tmp_path / "ml")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "transfer_study.py"), "--data", str(data), "--out", str(out),
           "--sizes", "4", "all", "--seeds", "0", "--threads", "1", "--jobs", "2",
           "--recipe", str(REPO / "configs" / "tiny.yaml"),
           "--set", "train.epochs=1", "train.max_steps=2", "--target-set", "train.max_steps=1",
           "--pretrain-set", "model.feature_dropout=0.5", "--heldout"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    sample = json.loads((out / "data" / "kids-4-s0" / "sample_report.json").read_text())
    assert sample["users"] == 4 and sample["seed"] == 0
    variants = {"pop", "scratch", "transfer-full-rec", "transfer-item_encoder-rec", "transfer-user_encoder-rec",
                "zero-shot-rec"}
    for size in ("4-s0", "all-s0"):
        assert {p.name for p in (out / "runs" / size).iterdir()} == variants
    points = json.loads((out / "curve" / "curve.json").read_text())["points"]
    assert {p["variant"] for p in points} == variants and {p["users"] for p in points} == {4, 12}
    gains = (out / "gains.md").read_text()
    assert gains.startswith("| gain over scratch, test NDCG@10 | 4 users | all users |")
    assert "| zero-shot-rec |" in gains and "| scratch |" not in gains
    # --target-set reaches the target runs, not pretraining
    assert "max_steps: 2" in (out / "pretrain" / "rec" / "config.yaml").read_text()
    assert "max_steps: 1" in (out / "runs" / "4-s0" / "scratch" / "config.yaml").read_text()
    # --pretrain-set reaches pretraining only (and a transfer does not inherit model.feature_dropout)
    assert "feature_dropout: 0.5" in (out / "pretrain" / "rec" / "config.yaml").read_text()
    assert "feature_dropout: 0.0" in (out / "runs" / "4-s0" / "scratch" / "config.yaml").read_text()
    assert "feature_dropout: 0.0" in (out / "runs" / "4-s0" / "transfer-full-rec" / "config.yaml").read_text()
    zero = json.loads((out / "runs" / "4-s0" / "zero-shot-rec" / "results.json").read_text())
    assert zero["evaluated"]["zero_shot"] is True and zero["num_users"] == 4
    # --heldout: each sample's models evaluated on the 8 kids users the sample did not draw
    rest = out / "data" / "kids-4-s0-rest"
    def users(folder):
        return {line.split("\t")[0] for line in (folder / "users.tsv").read_text().splitlines()[1:]}

    assert len(users(rest)) == 8 and not users(rest) & users(out / "data" / "kids-4-s0")
    for name in variants:
        held = json.loads((out / "heldout" / "4-s0" / name / "results.json").read_text())
        assert held["num_users"] == 8
        if name == "pop":
            assert held["baseline"] == f"most popular by the training counts of {out / 'data' / 'kids-4-s0'}"
        else:
            assert held["evaluated"]["domain"] == str(rest)
    table = (out / "gains-heldout.md").read_text()
    assert table.startswith("| test NDCG@10 | 4 users |") and "| gain over scratch, test NDCG@10 | 4 users |" in table
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # every run is reused
    assert again.returncode == 0 and (out / "gains.md").read_text() == gains
    # scripts/zero_shot_prior.py on the same pretrained model: weight 0 is the zero-shot evaluation itself
    prior = tmp_path / "prior.json"
    kids = out / "data" / "genres" / "kids"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "zero_shot_prior.py"), "--checkpoint",
                           str(out / "pretrain" / "rec" / "checkpoints" / "best.pt"), "--out", str(prior),
                           f"data.domain={kids}", "data.missing_image=blank", f"train.cache_dir={out / 'cache'}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(prior.read_text())["rows"]
    assert rows[0]["ratio"] == 0 and len(rows) == 9
    zero_all = json.loads((out / "runs" / "all-s0" / "zero-shot-rec" / "results.json").read_text())
    assert rows[0]["test"] == zero_all["test"]
    chosen = next(r for r in rows if r["ratio"] == json.loads(prior.read_text())["chosen_ratio"])
    paired = json.loads(prior.read_text())["chosen_minus_popularity"]
    assert paired["users"] == zero_all["num_users"]
    assert abs(paired["mean"] - (chosen["test"]["exclude_history"]["NDCG@10"]
                                 - rows[-1]["test"]["exclude_history"]["NDCG@10"])) < 1e-9
