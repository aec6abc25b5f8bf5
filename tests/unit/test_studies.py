"""scripts/studies.py: a run folder's wall time is kept on disk while the run goes, and summed over sessions."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

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
    try:
        studies.run_folder(folder, ["train", f"run.dir={folder}"], threads=1)
    except KeyboardInterrupt:
        pass
    first = float((folder / "wall_seconds").read_text())
    assert 0.1 <= seen[0] <= first and first >= 0.3

    def finishes(*args, threads):
        assert args[-1] == "--resume"  # checkpoints from the first session
        (folder / "results.json").write_text(json.dumps({"test": {}}))

    monkeypatch.setattr(studies, "pmmrec", finishes)
    out = studies.run_folder(folder, ["train", f"run.dir={folder}"], threads=1)
    assert first <= out["wall_seconds"] < first + 0.3
