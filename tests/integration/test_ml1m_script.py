"""scripts/ml1m_table.py end to end on a tiny MovieLens-shaped folder (the real data is never needed here)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _movielens_like(root: Path) -> Path:
    (root / "posters").mkdir(parents=True)
    movies = ["movie_id,title,genres"] + [f"{m},Movie number {m} ({1990 + m}),Drama" for m in range(1, 13)]
    (root / "movies.csv").write_text("\n".join(movies) + "\n")
    rows = ["user_id,movie_id,rating,timestamp"]
    for u in range(1, 9):
        for k in range(6 + u % 3):
            rows.append(f"{u},{(u + 2 * k) % 12 + 1},4,{1000 * u + k}")
    (root / "ratings.csv").write_text("\n".join(rows) + "\n")
    for m in range(1, 12):  # movie 12 has no poster
        buf = io.BytesIO()
        Image.new("RGB", (12, 18), (20 * m, 40, 90)).save(buf, format="JPEG")
        (root / "posters" / f"{m}.jpg").write_bytes(buf.getvalue())
    return root


def test_the_table_script_prepares_trains_and_writes_the_table(tmp_path):
    data = _movielens_like(tmp_path / "ml")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "scripts" / "ml1m_table.py"), "--data", str(data), "--out", str(out),
           "--only", "pop", "--seeds", "0", "1", "--threads", "1", "--jobs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (out / "table.md").read_text()
    assert "| most popular | 2 |" in table and "all 12 items ranked" in table
    rows = json.loads((out / "table.json").read_text())
    assert len(rows["pop"]) == 2 and rows["pop"][0]["wall_seconds"] >= 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # finished runs are reused
    assert again.returncode == 0 and (out / "table.md").read_text() == table


def test_missing_data_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "ml1m_table.py"), "--data", str(tmp_path / "no"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "is missing: point --data at the MovieLens-1M folder" in done.stderr
