"""What the study scripts (ml1m_table.py, transfer_study.py) share: pmmrec as a subprocess, and run folders that
are trained once, resumed when interrupted, and timed over all their sessions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pmmrec.utils.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
TICK = 30.0  # seconds between two writes of a running run's wall_seconds
T = TypeVar("T")


def pmmrec(*args: str, threads: int) -> None:
    """``python -m pmmrec ARGS`` with ``OMP_NUM_THREADS=threads``; a failure stops the study."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, "-m", "pmmrec", *args], check=True, env=env)


def require_movielens(data: Path) -> None:
    """Stop with a clear message unless ``data`` holds MovieLens-1M (ratings.csv, movies.csv, posters/)."""
    for name in ("ratings.csv", "movies.csv", "posters"):
        if not (data / name).exists():
            sys.exit(f"{data / name} is missing: point --data at the MovieLens-1M folder")


def run_folder(folder: Path, words: list[str], threads: int, resumable: bool = True) -> dict:
    """``results.json`` of the run in ``folder``, made first by ``pmmrec WORDS`` if missing (WORDS write the run
    there, e.g. with ``run.dir=FOLDER``, and end with the key=value overrides; ``--resume`` is added after them
    when an earlier session left checkpoints). ``wall_seconds`` in the result is the time of every session of the
    run, an interrupted one included: it is rewritten every ``TICK`` seconds while the run goes, so a session
    killed outright loses at most that much."""
    results, spent = folder / "results.json", folder / "wall_seconds"
    if not results.is_file():
        resume = ["--resume"] if resumable and (folder / "checkpoints").is_dir() else []
        before = float(spent.read_text()) if spent.is_file() else 0.0
        started, done = time.perf_counter(), threading.Event()

        def record() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(spent, f"{before + time.perf_counter() - started:.1f}\n")

        def tick() -> None:
            while not done.wait(TICK):
                record()

        threading.Thread(target=tick, daemon=True).start()
        try:
            pmmrec(*words, *resume, threads=threads)
        finally:
            done.set()
            record()
    out = json.loads(results.read_text())
    out["wall_seconds"] = float(spent.read_text()) if spent.is_file() else None
    return out


def run_all(tasks: Sequence[Callable[[], T]], jobs: int = 1) -> list[T]:
    """Each task's result, in order, with up to ``jobs`` of them running at once (each task starts its pmmrec
    subprocess; give each ``threads`` = cores / jobs): on small targets a second torch thread pays little, so two
    one-thread runs should get more done than one two-thread run (not measured yet). The first failure cancels the
    tasks not started yet and is raised once the running ones end (their runs stay resumable)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs == 1:
        return [task() for task in tasks]
    pool = ThreadPoolExecutor(max_workers=jobs)
    futures = [pool.submit(task) for task in tasks]
    try:
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
