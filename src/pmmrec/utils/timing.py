"""Phase timings of a start, for its log lines (``pmmrec bench start`` reads them back; docs/design.md §8)."""

from __future__ import annotations

import time


class PhaseClock:
    """Seconds spent in each named phase, measured lap by lap: ``clock.lap("digests")`` ends the phase so named
    (a name lapped twice adds up). ``str(clock)`` is ``"digests 0.412s, store read 0.031s"``."""

    def __init__(self):
        self.started = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        """Seconds from the clock's creation to its last lap."""
        return self.last - self.started

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.3f}s" for name, seconds in self.phases.items())
