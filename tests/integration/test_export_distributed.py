"""`torchrun --nproc_per_node 2 -m pmmrec export-embeddings` writes the store one process writes, bit for bit.

Batches of ``eval.batch_size=8`` over the 96-item target are dealt to the two ranks in turn and gathered; a
second export after two titles changed encodes those two items only (one batch: rank 1 has none).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pmmrec.cli import main
from pmmrec.config import load_config
from pmmrec.inference.vector_store import VectorStore
from pmmrec.training.api import fit

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "pmmrec",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _same_store(a: Path, b: Path) -> None:
    one, two = VectorStore(a).read(), VectorStore(b).read()
    assert one.ids == two.ids and one.key == two.key
    assert np.asarray(one.vectors).tobytes() == np.asarray(two.vectors).tobytes()  # bit for bit
    assert one.digests.tobytes() == two.digests.tobytes()


def test_two_processes_export_what_one_exports(quick_world, tmp_path):
    domain = Path(shutil.copytree(quick_world / "target", tmp_path / "target"))
    run = tmp_path / "run"
    fit(load_config(REPO / "configs" / "tiny.yaml", [f"data.domain={domain}", f"run.dir={run}", "train.max_steps=2"]))
    checkpoint = str(run / "checkpoints" / "last.pt")
    common = ["--checkpoint", checkpoint, "--domain", str(domain), "eval.batch_size=8"]

    assert main(["export-embeddings", *common, "--out", str(tmp_path / "one")]) == 0
    done = _torchrun("export-embeddings", *common, "--out", str(tmp_path / "two"))
    assert done.stdout.count("wrote 96 item vectors") == 1  # rank 0 alone speaks
    assert "distributed: 2 processes (gloo)" in done.stderr  # the batches were shared out, not all done twice
    _same_store(tmp_path / "one", tmp_path / "two")

    lines = (domain / "items.tsv").read_text().splitlines()
    for row in (5, 60):
        item_id = lines[row].split("\t")[0]
        lines[row] = f"{item_id}\tretitled snow castle {row}"
    (domain / "items.tsv").write_text("\n".join(lines) + "\n")
    assert main(["export-embeddings", *common, "--out", str(tmp_path / "one")]) == 0
    done = _torchrun("export-embeddings", *common, "--out", str(tmp_path / "two"))
    assert "(version 2: 2 encoded, 94 reused)" in done.stdout
    _same_store(tmp_path / "one", tmp_path / "two")
