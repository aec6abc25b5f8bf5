"""``pmmrec bench serve``: latency and throughput of ``POST /recommend`` under concurrent load (DESIGN section 15).

The service runs in its own process on loopback with a large catalogue (default 100,000 items). The catalogue
is **synthetic**: random item vectors (an ID embedding table) and a randomly initialised SASRec user encoder of
the CPU recipe's size. Serving cost does not depend on the values of trained weights, only on the catalogue
size, the vector dimension and the user encoder's shape, so this measures what a trained model would cost.
``clients`` concurrent httpx async clients (one connection each) then send a fixed number of requests (random
histories, k = 10) as fast as answers come back; every latency is measured on the client side.

With faiss installed, the JSON also reports an HNSW index's recall@10 against the exact top-10 on the same
vectors (what an approximate index for very large catalogues would give up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import socket
import time
from pathlib import Path

import numpy as np

from pmmrec.errors import PmmrecError
from pmmrec.utils.io import atomic_write_text

log = logging.getLogger(__name__)

FULL = {"items": 100_000, "clients": 50, "requests": 5000, "warmup": 200}
QUICK = {"items": 5_000, "clients": 10, "requests": 300, "warmup": 30}
DIM = 64  # model.dim of configs/cpu.yaml, the CPU recipe
MAX_SEQ_LEN = 20  # data.max_seq_len default (paper/ref)
K = 10
TARGET_P99_MS = 50.0  # the target: p99 < 50 ms at 50 concurrent clients on 2 CPU cores


def synthetic_recommender(num_items: int, dim: int = DIM, seed: int = 0):
    """A Recommender over ``num_items`` random item vectors, with a random SASRec user encoder."""
    import torch

    from pmmrec.config import load_config
    from pmmrec.inference.catalogue import Catalogue
    from pmmrec.inference.recommender import Recommender
    from pmmrec.models.pmmrec import PMMRec

    torch.manual_seed(seed)
    config = load_config(None, ["model.item_tower=id", f"model.dim={dim}", f"data.max_seq_len={MAX_SEQ_LEN}"])
    model = PMMRec(config, num_items).eval()
    ids = [f"i{n}" for n in range(1, num_items + 1)]
    vectors = model.item_encoder.id_embedding.weight.detach().clone()  # (N+1, D), row 0 = padding
    return Recommender(model, config, Catalogue(ids, vectors))


def _serve(port: int, num_items: int, threads: int, ready) -> None:
    """Child process: build the synthetic recommender and serve it until terminated."""
    import torch
    import uvicorn

    from pmmrec.serving.app import create_app

    torch.set_num_threads(threads)
    app = create_app(synthetic_recommender(num_items))
    ready.set()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drive(url: str, num_items: int, clients: int, requests: int, seed: int) -> tuple[list[float], int]:
    """``clients`` workers, each with its own connection, share ``requests`` requests; returns latencies (s)."""
    import httpx

    rng = np.random.default_rng(seed)
    bodies = [json.dumps({"history": [f"i{n}" for n in rng.integers(1, num_items + 1, size=int(length))],
                          "k": K}).encode()
              for length in rng.integers(5, 51, size=requests)]
    queue = list(range(requests))
    latencies: list[float] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            while queue:
                body = bodies[queue.pop()]
                started = time.perf_counter()
                r = await client.post("/recommend", content=body, headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - started)
                errors += r.status_code != 200

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, errors


def _wait_ready(url: str, process, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise PmmrecError("the benchmark's server process died while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise PmmrecError(f"the benchmark's server did not answer within {timeout:.0f} s")


def faiss_recall(num_items: int, queries: int = 200, k: int = K, seed: int = 0) -> dict | None:
    """Recall@k of an HNSW inner-product index against the exact top-k, on the synthetic vectors."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    import torch

    from pmmrec.inference.export import build_faiss_index

    rec = synthetic_recommender(num_items, seed=seed)
    _, vectors = rec.item_vectors()
    rng = np.random.default_rng(seed + 1)
    histories = [[f"i{n}" for n in rng.integers(1, num_items + 1, size=10)] for _ in range(queries)]
    users = torch.stack([rec.encode_user(h) for h in histories]).numpy()  # (Q, D)
    started = time.perf_counter()
    index = build_faiss_index(vectors, "hnsw")
    build_s = time.perf_counter() - started
    index.hnsw.efSearch = 128
    started = time.perf_counter()
    _, approx = index.search(users, k)
    ann_ms = (time.perf_counter() - started) * 1000 / queries
    started = time.perf_counter()
    exact = torch.from_numpy(users @ vectors.T).topk(k, dim=1).indices.numpy()
    exact_ms = (time.perf_counter() - started) * 1000 / queries
    recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))
    return {"index": "HNSW (M=32, efSearch=128), inner product", f"recall@{k}": round(recall, 4),
            "build_s": round(build_s, 2), "query_ms": round(ann_ms, 3), "exact_query_ms": round(exact_ms, 3),
            "queries": queries}


def run(args) -> dict:
    sizes = QUICK if getattr(args, "quick", False) else FULL
    try:
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PmmrecError("pmmrec bench serve needs FastAPI, uvicorn and httpx: pip install 'pmmrec[serve]'") from None
    out = Path(args.out or "bench-serve.json")
    for name in ("httpx", "httpcore"):  # one INFO line per request would load the client, and flood the terminal
        logging.getLogger(name).setLevel(logging.WARNING)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = 1  # one torch thread: concurrency comes from requests in parallel, not from splitting one product
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state inherited from this one
    ready = context.Event()
    process = context.Process(target=_serve, args=(port, sizes["items"], threads, ready), daemon=True)
    process.start()
    try:
        _wait_ready(url, process)
        log.info("bench serve: %d items, %d clients, %d requests", sizes["items"], sizes["clients"],
                 sizes["requests"])
        asyncio.run(_drive(url, sizes["items"], sizes["clients"], sizes["warmup"], seed=1))
        started = time.perf_counter()
        latencies, errors = asyncio.run(_drive(url, sizes["items"], sizes["clients"], sizes["requests"], seed=2))
        seconds = time.perf_counter() - started
        import httpx

        server = httpx.get(f"{url}/metrics", timeout=10).json()["routes"].get("/recommend", {})
    finally:
        process.terminate()
        process.join(10)
    ms = np.asarray(latencies) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]).tolist()
    result = {
        "benchmark": "serve", "endpoint": "POST /recommend", "quick": bool(getattr(args, "quick", False)),
        "catalogue": {"items": sizes["items"], "dim": DIM, "synthetic": True,
                      "note": "random item vectors and a randomly initialised SASRec user encoder (2 blocks, "
                              f"max_seq_len {MAX_SEQ_LEN}); serving cost does not depend on trained values"},
        "clients": sizes["clients"], "requests": sizes["requests"], "warmup_requests": sizes["warmup"], "k": K,
        "history_length": "uniform 5..50", "errors": errors,
        "seconds": round(seconds, 3), "throughput_rps": round(len(ms) / seconds, 1),
        "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2),
        "mean_ms": round(float(ms.mean()), 2), "max_ms": round(float(ms.max()), 2),
        "server_side": {k: server.get(k) for k in ("p50_ms", "p95_ms", "p99_ms")},
        "target_p99_ms": TARGET_P99_MS, "meets_target": p99 < TARGET_P99_MS,
        "cpu_cores": cores, "torch_threads": threads,
        # Other processes on the machine slow both sides down: the load average says how busy it was.
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "client_and_server": "same machine (the load generator competes with the server for the same cores)",
        "faiss": faiss_recall(sizes["items"]),
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"POST /recommend, {sizes['items']:,} synthetic items, {sizes['clients']} clients: "
          f"{result['throughput_rps']} req/s, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
          f"p99 {result['p99_ms']} ms ({'meets' if result['meets_target'] else 'misses'} the {TARGET_P99_MS:.0f} ms "
          f"target); wrote {out}")
    return result
