"""``pmmrec bench serve``: latency and throughput of ``POST /recommend`` under concurrent load (docs/design.md §15).

The service runs in its own process on loopback with a large catalogue (default 100,000 items). The catalogue
is **synthetic**: random item vectors (an ID embedding table) and a randomly initialised SASRec user encoder of
the CPU recipe's size. Serving cost does not depend on the values of trained weights, only on the catalogue
size, the vector dimension and the user encoder's shape, so this measures what a trained model would cost.
The server is set up as ``pmmrec serve`` sets it up (one torch thread per scoring batch, one batch per core at a
time, the heap frozen for the garbage collector, uvloop and httptools when installed). ``clients`` concurrent
aiohttp clients (one keep-alive connection each, on uvloop when installed) then send a fixed number of requests
(random histories, k = 10) as fast as answers come back; every latency is measured on the client side, so it
includes the client's own time, on the same cores as the server.

``--items N`` changes the catalogue size, ``--catalogue clustered`` the vectors
(:func:`pmmrec.bench.catalogue.catalogue_vectors`), and ``--index`` the search as ``pmmrec serve --index`` does
(default ``auto``: exact at 100,000 items, HNSW above :data:`~pmmrec.inference.ann.AUTO_EXACT_MAX_ITEMS`). When
the served index is approximate, the JSON reports its recall@10 against exact search on the same catalogue
(``recall``; the served top-10 of 500 random histories, history excluded, against the exact top-10).
``--ef-search`` and ``--nprobe`` set its search effort, and ``--work DIR`` keeps the built index in ``DIR/index``
and reads it back on the next run over the same catalogue (``recall.cached``), so that a sweep of search efforts
over a million items builds the graph once.

``--workers N`` (N > 1) serves the catalogue as ``pmmrec serve --workers N`` does: its vectors are written to a
vector store (a temporary folder) that N uvicorn worker processes memory-map and follow
(:mod:`pmmrec.inference.shared_store`); recall is not measured. Whatever the number of workers, the JSON reports
each server process's memory once the load has run (``memory``, Linux ``/proc``): peak resident set (``VmHWM``),
resident set split into anonymous (the process's own: model, ids, indexes) and file-backed pages (``RssAnon``,
``RssFile``; mapped files such as the shared vectors, and libraries, resident once in the page cache whoever maps
them), proportional set size (``Pss``: shared pages divided among the processes mapping them, so the sum over the
workers is what they cost together) and, for the store's vectors file, the resident and proportional share of its
mapping in each worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from pmmrec.bench.catalogue import (
    CATALOGUES,
    DIM,
    MAX_SEQ_LEN,
    histories,
    measure_recall,
    shared_synthetic_recommender,
    synthetic_recommender,
    write_synthetic_store,
)
from pmmrec.errors import PmmrecError
from pmmrec.serving.server import batch_concurrency, freeze_heap  # no FastAPI import at module level
from pmmrec.utils.io import atomic_write_text
from pmmrec.utils.malloc import tune_malloc

log = logging.getLogger(__name__)

FULL = {"items": 100_000, "clients": 50, "requests": 5000, "warmup": 200}
RECALL_QUERIES = 500  # histories the served approximate index's recall@10 is measured on
QUICK = {"items": 5_000, "clients": 10, "requests": 300, "warmup": 30}
K = 10
TARGET_P99_MS = 50.0  # the target: p99 < 50 ms at 50 concurrent clients on 2 CPU cores
_WORKER_ENV = "PMMREC_BENCH_SERVE_WORKER"  # JSON options of the worker processes (--workers N)


def _settings(search: dict):
    """The served index's settings: the defaults, with ``search`` (``hnsw_ef_search``, ``ivf_nprobe``) given."""
    from pmmrec.inference.ann import IndexSettings

    return IndexSettings(**search)


def _serve(port: int, num_items: int, threads: int, ready, catalogue: str, index: str, recall, search: dict,
           index_cache: str | None) -> None:
    """Child process: build the synthetic recommender and serve it as ``pmmrec serve`` would, until terminated.

    With an approximate index, its recall@10 against exact search on the same catalogue is measured first (before
    serving, with the threads loading has) and sent through the ``recall`` queue; None otherwise."""
    import torch
    import uvicorn

    from pmmrec.inference.recommender import Recommender
    from pmmrec.serving.app import create_app

    tune_malloc()  # what the pmmrec command does at start
    recommender = synthetic_recommender(num_items, catalogue=catalogue, index=index,
                                        index_settings=_settings(search), index_cache=index_cache)
    measured = None
    if recommender.approximate_index is not None:
        exact = Recommender(recommender.model, recommender.config, recommender.catalogue, index="exact")
        measured = {"index": recommender.approximate_index.describe,
                    "build_s": round(recommender.approximate_index.build_s, 1),
                    "cached": recommender.approximate_index.cached,
                    **measure_recall(exact, recommender, histories(num_items, RECALL_QUERIES))}
    recall.put(measured)
    torch.set_num_threads(threads)
    app = create_app(recommender, batch_concurrency=batch_concurrency(threads))
    freeze_heap()
    ready.set()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


class _Workers:
    """``--workers N``: uvicorn's supervisor in a fresh interpreter (a multiprocessing child cannot be one: its
    workers reopen its stdin), serving :func:`worker_app` in ``workers`` processes over the store ``store``."""

    def __init__(self, port: int, workers: int, threads: int, store: str, index: str, search: dict,
                 index_cache: str | None):
        env = dict(os.environ, **{_WORKER_ENV: json.dumps({"store": store, "index": index, "threads": threads,
                                                           "workers": workers, "search": search,
                                                           "index_cache": index_cache})})
        code = ("import uvicorn; uvicorn.run('pmmrec.bench.serve:worker_app', factory=True, host='127.0.0.1', "
                f"port={port}, workers={workers}, log_level='warning', access_log=False)")
        self.popen = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL)
        self.pid = self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        self.popen.terminate()  # uvicorn stops its workers, then exits

    def join(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)


def worker_app():
    """uvicorn factory of one ``--workers N`` worker: the shared synthetic store, served as ``pmmrec serve``
    serves it (followed, one torch thread per batch, the heap frozen)."""
    import torch

    from pmmrec.serving.app import create_app

    options = json.loads(os.environ[_WORKER_ENV])
    tune_malloc()
    recommender = shared_synthetic_recommender(options["store"], index=options["index"],
                                               index_settings=_settings(options["search"]),
                                               index_cache=options["index_cache"])
    # Every page of the mapped vectors read once, as the first requests would: each worker's memory figures then do
    # not depend on which of the requests it happened to take.
    recommender.recommend(["i1"], k=K)
    torch.set_num_threads(options["threads"])
    app = create_app(recommender, batch_concurrency=batch_concurrency(options["threads"], options["workers"]))
    recommender.follow()
    app.router.add_event_handler("shutdown", recommender.close)
    freeze_heap()
    return app


def _kib_fields(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """``name: kB`` for the lines ``Name:   123 kB`` of a /proc file (fields it lacks are left out)."""
    out = {}
    try:
        for line in path.read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in names and rest.strip().endswith("kB"):
                out[name] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _mapping_kib(pid: int, file: Path) -> dict[str, int]:
    """Resident (``Rss``) and proportional (``Pss``) kB of process ``pid``'s mappings of ``file`` (/proc/PID/smaps)."""
    out = {"Rss": 0, "Pss": 0}
    target, inside = str(file), False
    try:
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
                inside = len(head) == 6 and head[5] == target
            elif inside and head and head[0] in ("Rss:", "Pss:"):
                out[head[0][:-1]] += int(head[1])
    except (OSError, ValueError):
        pass
    return out


def process_memory(pid: int, vectors_file: Path | None = None) -> dict | None:
    """Memory of process ``pid`` in MiB (Linux /proc; None elsewhere): see the module docstring."""
    status = _kib_fields(Path(f"/proc/{pid}/status"), ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"))
    if not status:
        return None
    rollup = _kib_fields(Path(f"/proc/{pid}/smaps_rollup"), ("Pss", "Pss_Anon", "Pss_File"))
    mib = lambda kib: round(kib / 1024, 1) if kib is not None else None  # noqa: E731
    out = {"pid": pid, "peak_rss_mib": mib(status.get("VmHWM")), "rss_mib": mib(status.get("VmRSS")),
           "rss_anon_mib": mib(status.get("RssAnon")), "rss_file_mib": mib(status.get("RssFile")),
           "pss_mib": mib(rollup.get("Pss")), "pss_anon_mib": mib(rollup.get("Pss_Anon")),
           "pss_file_mib": mib(rollup.get("Pss_File"))}
    if vectors_file is not None:
        mapped = _mapping_kib(pid, vectors_file)
        out["vectors_file"] = {"rss_mib": mib(mapped["Rss"]), "pss_mib": mib(mapped["Pss"])}
    return out


def _memory_report(pids: list[int], vectors_file: Path | None, vector_bytes: int) -> dict:
    """Each server process's memory and the sums over them (what they take together: the sum of ``pss_mib``)."""
    per = [m for m in (process_memory(pid, vectors_file) for pid in pids) if m is not None]
    total = {}
    for name in ("peak_rss_mib", "rss_mib", "rss_anon_mib", "rss_file_mib", "pss_mib"):
        values = [m[name] for m in per if m.get(name) is not None]
        total[name] = round(sum(values), 1) if values else None
    return {"processes": per, "sum": total, "vectors_mib": round(vector_bytes / 2**20, 1),
            "note": "peak_rss (VmHWM) and rss count shared file pages (the mapped vectors, libraries) in every "
                    "process; pss divides them among the processes, so the sum of pss is what they cost together"}


def _worker_pids(url: str, workers: int, timeout: float) -> list[int]:
    """The process ids of the workers, from /health asked on new connections, several at once (while one worker is
    busy answering, another accepts the next), until all ``workers`` answered: the first to be ready answers
    while the others may still be loading."""
    from concurrent.futures import ThreadPoolExecutor

    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    with ThreadPoolExecutor(2 * workers) as pool:
        while len(seen) < workers:
            if time.monotonic() > deadline:
                raise PmmrecError(f"only {len(seen)} of the {workers} workers answered /health within "
                                  f"{timeout:.0f} s")
            seen.update(pool.map(lambda _: int(_get_json(f"{url}/health", timeout=10)["worker"]),
                                 range(2 * workers)))
            time.sleep(0.05)
    return sorted(seen)


def _installed(module: str) -> str | None:
    """``module`` when it can be imported (uvicorn then uses it), else None."""
    import importlib.util

    return module if importlib.util.find_spec(module) is not None else None


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _cpu_sum(pids: list[int]) -> float | None:
    seconds = [_cpu_seconds(pid) for pid in pids]
    return None if None in seconds else sum(seconds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _drive(url: str, num_items: int, clients: int, requests: int, seed: int) -> tuple[list[float], int]:
    """``clients`` workers, each with its own connection, share ``requests`` requests; returns latencies (s)."""
    import aiohttp

    rng = np.random.default_rng(seed)
    bodies = [json.dumps({"history": [f"i{n}" for n in rng.integers(1, num_items + 1, size=int(length))],
                          "k": K}).encode()
              for length in rng.integers(5, 51, size=requests)]
    queue = list(range(requests))
    latencies: list[float] = []
    errors = 0
    headers = {"content-type": "application/json"}

    async def worker(session) -> None:
        nonlocal errors
        while queue:
            body = bodies[queue.pop()]
            started = time.perf_counter()
            async with session.post(f"{url}/recommend", data=body, headers=headers) as r:
                await r.read()
                latencies.append(time.perf_counter() - started)
                errors += r.status != 200

    # One keep-alive connection per client (the pool holds `clients` of them).
    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(worker(session) for _ in range(clients)))
    return latencies, errors


def _run_client(coroutine):
    """Run the load generator on uvloop when it is installed (a cheaper client leaves more CPU to the server)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


def _get_json(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_ready(url: str, process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise PmmrecError("the benchmark's server process died while starting")
        try:
            if _get_json(f"{url}/health", timeout=2).get("status") == "ok":
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    raise PmmrecError(f"the benchmark's server did not answer within {timeout:.0f} s")


def run(args) -> dict:
    sizes = dict(QUICK if getattr(args, "quick", False) else FULL)
    if getattr(args, "items", None) is not None:
        if args.items < 2:
            raise PmmrecError(f"--items must be at least 2, got {args.items}")
        sizes["items"] = args.items
    catalogue, index = getattr(args, "catalogue", None) or "random", getattr(args, "index", None) or "auto"
    if catalogue not in CATALOGUES:
        raise PmmrecError(f"--catalogue must be one of {', '.join(CATALOGUES)}, got {catalogue!r}")
    try:
        import aiohttp  # noqa: F401
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PmmrecError("pmmrec bench serve needs FastAPI, uvicorn and aiohttp: pip install 'pmmrec[serve]'") from None
    out = Path(args.out or "bench-serve.json")
    workers = getattr(args, "workers", None) or 1
    if workers < 1:
        raise PmmrecError(f"--workers must be at least 1, got {workers}")
    search = {name: value for name, value in (("hnsw_ef_search", getattr(args, "ef_search", None)),
                                              ("ivf_nprobe", getattr(args, "nprobe", None))) if value is not None}
    _settings(search)  # a bad value is an error here, not in the server process
    work = getattr(args, "work", None)
    index_cache = str(Path(work) / "index") if work else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = 1  # pmmrec serve's default: one torch thread per batch, batches side by side
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no state inherited from this one
    folder = vectors_file = process = None
    # Start-up encodes nothing but may build an index and measure its recall. HNSW over a million items took
    # 1,198 s on 2 idle cores (1.2 ms an item) and over 1,300 s on a busy one: allow 4 ms an item where an index
    # may be built (hnsw, ivf, or auto above its threshold), 1 ms otherwise. A server that dies is reported at
    # once, whatever the allowance.
    startup = 300.0 + sizes["items"] * (0.004 if index in ("hnsw", "ivf", "auto") else 0.001)
    # Everything that starts the server sits inside the `try`, so its `finally` stops the server whatever ends the
    # run (`pmmrec bench` turns SIGTERM into SystemExit for this).
    try:
        if workers > 1:  # the catalogue as a vector store that the workers share
            folder = Path(tempfile.mkdtemp(prefix="pmmrec-bench-store-"))
            write_synthetic_store(folder, sizes["items"], catalogue)
            vectors_file = (folder / "000001.vectors.npy").resolve()
            process = _Workers(port, workers, threads, str(folder), index, search, index_cache)
        else:
            ready, recall_queue = context.Event(), context.Queue()
            process = context.Process(target=_serve, args=(port, sizes["items"], threads, ready, catalogue, index,
                                                           recall_queue, search, index_cache), daemon=True)
            process.start()
        _wait_ready(url, process, timeout=startup)
        recall = recall_queue.get(timeout=10) if workers == 1 else None
        pids = _worker_pids(url, workers, timeout=startup) if workers > 1 else [process.pid]
        served_index = _get_json(f"{url}/health", timeout=10).get("index")
        log.info("bench serve: %d items, %d clients, %d requests", sizes["items"], sizes["clients"],
                 sizes["requests"])
        _run_client(_drive(url, sizes["items"], sizes["clients"], sizes["warmup"], seed=1))
        server_cpu, client_cpu = _cpu_sum(pids), _cpu_seconds(os.getpid())
        started = time.perf_counter()
        latencies, errors = _run_client(_drive(url, sizes["items"], sizes["clients"], sizes["requests"], seed=2))
        seconds = time.perf_counter() - started
        server_cpu, client_cpu = (None if a is None or b is None else round(b - a, 2)
                                  for a, b in ((server_cpu, _cpu_sum(pids)),
                                               (client_cpu, _cpu_seconds(os.getpid()))))
        server = _get_json(f"{url}/metrics", timeout=10)["routes"].get("/recommend", {})
        memory = _memory_report(pids, vectors_file, sizes["items"] * DIM * 4)
    finally:
        if process is not None:
            process.terminate()
            process.join(10)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    ms = np.asarray(latencies) * 1000.0
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]).tolist()
    result = {
        "benchmark": "serve", "endpoint": "POST /recommend", "quick": bool(getattr(args, "quick", False)),
        "catalogue": {"items": sizes["items"], "dim": DIM, "synthetic": True, "vectors": catalogue,
                      "note": f"{catalogue} item vectors and a randomly initialised SASRec user encoder (2 blocks, "
                              f"max_seq_len {MAX_SEQ_LEN}); serving cost does not depend on trained values"},
        "index": served_index, "recall": recall, "workers": workers,
        "workers_share": "one vector store, memory-mapped by each worker" if workers > 1 else None,
        "memory": memory,
        "clients": sizes["clients"], "requests": sizes["requests"], "warmup_requests": sizes["warmup"], "k": K,
        "history_length": "uniform 5..50", "errors": errors,
        "seconds": round(seconds, 3), "throughput_rps": round(len(ms) / seconds, 1),
        "p50_ms": round(p50, 2), "p95_ms": round(p95, 2), "p99_ms": round(p99, 2),
        "mean_ms": round(float(ms.mean()), 2), "max_ms": round(float(ms.max()), 2),
        "server_side": {k: server.get(k) for k in ("p50_ms", "p95_ms", "p99_ms")},
        "target_p99_ms": TARGET_P99_MS, "meets_target": p99 < TARGET_P99_MS,
        "cpu_cores": cores, "torch_threads": threads, "batch_concurrency": batch_concurrency(threads, workers),
        "server_loop": _installed("uvloop") or "asyncio", "server_http": _installed("httptools") or "h11",
        "client": "aiohttp", "server_cpu_s": server_cpu, "client_cpu_s": client_cpu,
        # Other processes on the machine slow both sides down: the load average says how busy it was.
        "load_average_1m": {"before": load_before, "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "client_and_server": "same machine (the load generator competes with the server for the same cores)",
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    recall_text = f", recall@{K} {recall[f'recall@{K}']} against exact" if recall else ""
    print(f"POST /recommend, {sizes['items']:,} synthetic items ({catalogue}, index {served_index}{recall_text}), "
          f"{sizes['clients']} clients: "
          f"{result['throughput_rps']} req/s, p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, "
          f"p99 {result['p99_ms']} ms ({'meets' if result['meets_target'] else 'misses'} the {TARGET_P99_MS:.0f} ms "
          f"target); wrote {out}")
    total = memory["sum"]
    print(f"memory of {len(memory['processes'])} server process(es): peak RSS {total['peak_rss_mib']} MiB in all "
          f"(per process: {', '.join(str(m['peak_rss_mib']) for m in memory['processes'])}), of which now anonymous "
          f"{total['rss_anon_mib']} and file-backed {total['rss_file_mib']}; PSS {total['pss_mib']} MiB (vectors: "
          f"{memory['vectors_mib']} MiB)")
    return result
