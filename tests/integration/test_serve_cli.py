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
    assert main(["export-embeddings", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "v")]) == 0
    assert "wrote 96 item vectors of dimension 32 to the vector store" in capsys.readouterr().out
    assert np.load(tmp_path / "v" / "000001.vectors.npy").shape == (96, 32)
    assert len((tmp_path / "v" / "000001.ids.txt").read_text().split()) == 96
    # Again into the same store: nothing to encode.
    assert main(["export-embeddings", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "v")]) == 0
    assert "(version 1: 0 encoded, 96 reused)" in capsys.readouterr().out
    assert main(["export-embeddings", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "v.npy")]) == 2
    assert "writes a vector store, a folder" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["export-embeddings", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "notes")]) == 2
    assert "not a vector store's (todo.txt)" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


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


def test_serve_embeddings_answers_from_the_exported_store(checkpoint, quick_world, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from pmmrec.serving.server import build_app

    store = tmp_path / "exported"
    assert main(["export-embeddings", "--checkpoint", str(checkpoint), "--out", str(store)]) == 0
    client = TestClient(build_app(str(checkpoint), embeddings=str(store)))
    assert client.get("/health").json()["items"] == 96
    r = client.post("/recommend", json={"history": ["ta3", "ta17"], "k": 3})
    assert r.status_code == 200 and len(r.json()["items"]) == 3
    # Another model's checkpoint against that store: one line naming both digests, exit status 2.
    run = tmp_path / "other"
    fit(load_config(REPO / "configs" / "tiny.yaml", [f"data.domain={quick_world / 'target'}", f"run.dir={run}",
                                                     "train.max_steps=1", "seed=3"]))
    capsys.readouterr()
    assert main(["serve", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--embeddings", str(store)]) == 2
    err = capsys.readouterr().err
    weights = json.loads((store / "store.json").read_text())["key"]["weights"]
    assert err.startswith("pmmrec: error: --embeddings") and weights in err and err.count("weights") == 2
    assert main(["serve", "--checkpoint", str(checkpoint), "--embeddings", str(store), "--no-store"]) == 2
    assert "do not apply" in capsys.readouterr().err


def test_posted_items_are_served_after_a_restart_without_encoding(checkpoint, quick_world, tmp_path, monkeypatch):
    import base64
    import shutil

    from fastapi.testclient import TestClient

    from pmmrec.data.image_db import ImageDB
    from pmmrec.inference.vector_store import VectorStore
    from pmmrec.models.pmmrec import PMMRec
    from pmmrec.serving.server import build_app

    domain = shutil.copytree(quick_world / "target", tmp_path / "target")
    store = tmp_path / "store"
    options = {"domain": str(domain), "persist_items": True, "store": str(store)}
    db = ImageDB(domain / "images.lmdb")
    image = base64.b64encode(db.get("ta3")).decode()
    db.close()
    client = TestClient(build_app(str(checkpoint), **options))
    r = client.post("/items", json={"items": [{"item_id": "posted", "title": "sea wave ship", "image": image}]})
    assert r.status_code == 201 and r.json()["persisted"] is True
    assert VectorStore(store).read().ids[-1] == "posted"  # appended to the store at once
    calls = []
    original = PMMRec.encode_items
    monkeypatch.setattr(PMMRec, "encode_items", lambda self, items: calls.append(1) or original(self, items))
    restarted = TestClient(build_app(str(checkpoint), **options))
    assert calls == []  # the whole catalogue, the posted item included, came from the store
    assert restarted.get("/items/posted").json()["added"] is False  # now a catalogue item, from the domain
    assert restarted.get("/health").json()["items"] == 97


def test_serve_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow  # starts a server process and sends 330 requests: about 20-30 s
def test_bench_serve_quick_writes_the_contract(tmp_path):
    pytest.importorskip("faiss")
    out = tmp_path / "bench.json"
    # Served through an HNSW index (5,000 items: auto would score exactly), its recall measured first.
    assert main(["bench", "serve", "--quick", "--index", "hnsw", "--ef-search", "256", "--work", str(tmp_path / "w"),
                 "--out", str(out)]) == 0
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
    assert "efSearch=256" in recall["index"] and recall["cached"] is False  # built, and kept for the next run
    assert len(list((tmp_path / "w" / "index").glob("hnsw-*.faiss"))) == 1


def _start_server(*args: str) -> tuple[subprocess.Popen, str]:
    """``pmmrec serve`` with ``args`` on a free loopback port, once it answers; returns the process and base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "pmmrec", "serve", "--port", str(port), "--threads", "1",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None, process.stdout.read().decode()
        try:
            httpx.get(f"{url}/health", timeout=2)
            return process, url
        except httpx.TransportError:
            assert time.monotonic() < deadline, "pmmrec serve did not answer"
            time.sleep(0.3)


def _healths(url: str, n: int = 8) -> list[dict]:
    """``n`` answers of /health, asked at once on new connections: the kernel hands each connection to one of the
    workers accepting on the shared socket, and while one is busy answering, another takes the next."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: httpx.get(f"{url}/health", timeout=10).json(), range(n)))


def _workers_seen(url: str, want: int, timeout: float = 120) -> dict[int, dict]:
    """The /health of each worker that answered, by process id, until ``want`` of them did (the first worker to
    be ready answers while the others may still be loading)."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        seen.update((h["worker"], h) for h in _healths(url))
        time.sleep(0.05)
    return seen


@pytest.mark.slow  # three fresh interpreters (a sync before the workers, two workers) import torch: about 20-40 s
def test_serve_workers_share_one_catalogue_and_its_additions(checkpoint, quick_world, tmp_path):
    import base64
    import concurrent.futures
    import shutil

    from pmmrec.data.image_db import ImageDB
    from pmmrec.inference.vector_store import VectorStore

    domain = shutil.copytree(quick_world / "target", tmp_path / "target")
    store = tmp_path / "store"
    process, url = _start_server("--checkpoint", str(checkpoint), "--domain", str(domain), "--store", str(store),
                                 "--workers", "2")
    try:
        workers = _workers_seen(url, 2)
        assert len(workers) == 2, "only one worker answered"
        assert all(h["items"] == 96 and h["can_add_items"] and h["store_version"] == 1 for h in workers.values())
        db = ImageDB(domain / "images.lmdb")
        image = base64.b64encode(db.get("ta3")).decode()
        db.close()
        r = httpx.post(f"{url}/items", json={"items": [{"item_id": "posted", "title": "sea wave ship",
                                                        "image": image}]}, timeout=60)
        assert r.status_code == 201, r.text
        posted = time.monotonic()
        # Every worker serves it soon (each looks at store.json every 0.25 s): its catalogue has 97 items, and
        # both answer for the item, with its title, and recommend it.
        late: dict[int, float] = {}
        while len(late) < 2 and time.monotonic() - posted < 20:
            for health in _healths(url):
                if health["items"] == 97 and health["store_version"] == 2:
                    late.setdefault(health["worker"], time.monotonic() - posted)
        assert set(late) == set(workers), f"not every worker picked the item up: {late}"
        assert max(late.values()) < 5.0, late  # 0.25 s polls; a generous bound for a busy machine
        for _ in range(20):  # any worker
            item = httpx.get(f"{url}/items/posted", timeout=10)
            assert item.status_code == 200 and item.json()["title"] == "sea wave ship" and item.json()["has_image"]
            assert httpx.get(f"{url}/items/posted/image", timeout=10).content == base64.b64decode(image)
            rec = httpx.post(f"{url}/recommend", json={"history": ["ta3", "ta17"], "k": 97}, timeout=10)
            assert "posted" in {x["item_id"] for x in rec.json()["items"]}

        # The same new id from several clients at once: exactly one is added, the others are told 409.
        def post(n: int) -> int:
            body = {"items": [{"item_id": "race", "title": f"client {n}"}]}
            return httpx.post(f"{url}/items", json=body, timeout=60).status_code

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(post, range(6)))
        assert codes == [201] + [409] * 5, codes
        stored = VectorStore(store).read()  # every file checked
        assert stored.ids.count("race") == 1 and stored.ids.count("posted") == 1 and len(stored.ids) == 98
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.slow  # a server with two workers and 330 requests: about 20-30 s
def test_bench_serve_workers_reports_each_workers_memory(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "serve", "--quick", "--items", "3000", "--workers", "2", "--index", "exact",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["workers"] == 2 and result["errors"] == 0 and result["requests"] == 300
    memory = result["memory"]
    assert len({p["pid"] for p in memory["processes"]}) == 2
    for process in memory["processes"]:
        # Both workers read the one vectors file through their mapping; it is shared, so each one's share of it
        # (pss) is half of what is resident.
        assert process["vectors_file"]["rss_mib"] == pytest.approx(memory["vectors_mib"], abs=0.1)
        assert process["vectors_file"]["pss_mib"] == pytest.approx(memory["vectors_mib"] / 2, abs=0.1)
    assert memory["sum"]["pss_mib"] < memory["sum"]["rss_mib"]


def test_a_worker_of_several_adds_items_only_through_a_shared_store(checkpoint, quick_world, tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from pmmrec.serving.server import build_app

    domain = str(shutil.copytree(quick_world / "target", tmp_path / "target"))
    item = {"items": [{"item_id": "n1", "title": "sea wave"}]}
    with TestClient(build_app(str(checkpoint), domain=domain, workers=2, store=None)) as alone:
        r = alone.post("/items", json=item)
        assert r.status_code == 409 and "without a shared vector store" in r.json()["detail"]
        health = alone.get("/health").json()
        assert health["can_add_items"] is False and health["store_version"] is None
    store = str(tmp_path / "store")
    with TestClient(build_app(str(checkpoint), domain=domain, workers=2, store=store, shared=True)) as one, \
            TestClient(build_app(str(checkpoint), domain=domain, workers=2, store=store, shared=True)) as two:
        assert one.post("/items", json=item).status_code == 201
        assert two.post("/items", json=item).status_code == 409  # the store says it is taken
        assert two.get("/items/n1").json()["title"] == "sea wave"
        assert one.get("/health").json()["store_version"] == two.get("/health").json()["store_version"] == 2


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the server process through /proc")
def test_bench_serve_stops_its_server_when_terminated(tmp_path):
    """A SIGTERM to `pmmrec bench serve` (kill, a CI timeout) stops the server process it started, rather than
    leaving it building an index or serving on its own."""
    import contextlib
    import os
    import signal

    def children(pid: int) -> list[int]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # "pid (name) state ppid ...": the name may hold spaces, so split after its ")"
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):  # gone meanwhile
                pass
        return found

    def cmdline(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    bench = subprocess.Popen([sys.executable, "-m", "pmmrec", "bench", "serve", "--quick", "--index", "exact",
                              "--out", str(tmp_path / "bench.json")])
    deadline, servers = time.monotonic() + 60, []
    while not servers and time.monotonic() < deadline:  # the spawned server (multiprocessing's tracker aside)
        servers = [c for c in children(bench.pid) if "spawn_main" in cmdline(c)]
        time.sleep(0.1)
    try:
        assert servers, "bench serve started no server process within 60 s"
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{s}").exists() for s in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{s}").exists() for s in servers), "the server outlived bench serve"
        assert not (tmp_path / "bench.json").exists()
    finally:  # whatever failed, leave no process behind
        bench.kill()
        for pid in servers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
