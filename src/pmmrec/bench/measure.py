"""Measuring helpers shared by the benchmarks: peak memory of a phase, wall time with device synchronisation."""

from __future__ import annotations

import os
import resource
import threading
import time

import torch

from pmmrec.utils.malloc import release_memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The resident set size of this process now (Linux /proc; the peak so far elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak RSS (sampled every ``interval`` seconds by a thread) and CUDA max-allocated within a ``with`` block.

    ``ru_maxrss`` is the process's peak since it started, so it cannot separate two phases of one run; sampling
    can miss a spike shorter than the interval, which the figures accept.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.02):
        self.device, self.interval = torch.device(device), interval
        self.peak_rss = self.start_rss = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, rss_bytes())

    def __enter__(self) -> PeakMemory:
        release_memory()  # what earlier phases freed is given back, so that this phase's peak is its own
        self.start_rss = self.peak_rss = rss_bytes()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_bytes())
        if self.device.type == "cuda":
            self.cuda_peak = torch.cuda.max_memory_allocated(self.device)

    def to_dict(self) -> dict:
        out = {"peak_rss_mb": round(self.peak_rss / 2**20, 1),
               "rss_increase_mb": round((self.peak_rss - self.start_rss) / 2**20, 1)}
        if self.cuda_peak is not None:
            out["cuda_max_allocated_mb"] = round(self.cuda_peak / 2**20, 1)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[object, float]:
    """``fn()`` and its wall time in seconds, device work included."""
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started
