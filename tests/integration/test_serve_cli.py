"""`pmmrec recommend`, `export-embeddings` and `serve` end to end on a tiny trained checkpoint."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from pmmrec.cli import main
from pmmrec.config import load_config
from pmmrec.training.api import fit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(quick_world, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    config = load_config(REPO / "configs" / "tiny.yaml", [f"data.domain={quick_world / 'target'}", f"run.dir={run}",
                                                         "train.epochs=1", "train.max_steps=1"])
    fit(config)
    return run / "checkpoints" / "best.pt"


def test_recommend_and_export_commands(checkpoint, tmp_path, capsys):
    assert main(["recommend", "--checkpoint", str(checkpoint), "--history", "ta3 ta17 nope", "-k", "4", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert len(body["items"]) == 4 and body["unknown"] == ["nope"]
    assert not {"ta3", "ta17"} & {x["item_id"] for x in body["items"]}
    assert main(["recommend", "--checkpoint", str(checkpoint), "--history", "ta3 nope", "--strict"]) == 2
    assert "unknown item id(s) in the history: 'nope'" in capsys.readouterr().err
    assert main(["recommend", "--checkpoint", str(checkpoint), "--history", "ta3", "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1"
    assert main(["export-embeddings", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape == (96, 32)
    assert len((tmp_path / "v.ids.txt").read_text().split()) == 96


@pytest.mark.slow  # a fresh interpreter imports torch and loads the model: about 10 s
def test_serve_command_runs_a_server(checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "pmmrec", "serve", "--checkpoint", str(checkpoint),
                                "--port", str(port), "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "pmmrec serve did not answer"
                time.sleep(0.3)
        assert health.json()["items"] == 96
        r = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"history": ["ta3", "ta17"], "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3
    finally:
        process.terminate()
        process.wait(30)


def test_serve_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow  # starts a server process and sends 330 requests: about 20-30 s
def test_bench_serve_quick_writes_the_contract(tmp_path):
    pytest.importorskip("faiss")
    out = tmp_path / "bench.json"
    # Served through an HNSW index (5,000 items: auto would score exactly), its recall measured first.
    assert main(["bench", "serve", "--quick", "--index", "hnsw", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "serve" and result["catalogue"]["synthetic"] is True
    assert result["errors"] == 0 and result["requests"] == 300 and result["throughput_rps"] > 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["client"] == "aiohttp" and result["batch_concurrency"] >= 1
    if result["server_cpu_s"] is not None:  # Linux: the server did the work, the client sent the requests
        assert result["server_cpu_s"] > 0 and result["client_cpu_s"] > 0
    assert result["index"] == "hnsw" and result["catalogue"]["vectors"] == "random"
    recall = result["recall"]
    assert 0.9 <= recall["recall@10"] <= 1.0 and recall["queries"] == 500
    assert recall["history_items_returned"] == 0 and recall["short_answers"] == 0
