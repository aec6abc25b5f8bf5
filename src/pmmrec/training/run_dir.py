"""Run folders: ``runs/<name>/`` with config.yaml, metrics.jsonl, log.txt, checkpoints/, results.json."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from pmmrec.config import Config, dump_config
from pmmrec.utils.io import atomic_write_text

log = logging.getLogger(__name__)


class RunDir:
    """The files of one run. Only the main process writes (the caller decides who that is)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    def create(self, config: Config) -> RunDir:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        # A process killed while writing a checkpoint leaves its hidden temporary file (never a torn last.pt,
        # the write is atomic); nothing reads those, so a new or resumed run clears them.
        for stale in self.checkpoints.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        dump_config(config, self.path / "config.yaml")
        handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("pmmrec").addHandler(handler)
        self._handler = handler
        return self

    def close(self) -> None:
        handler = getattr(self, "_handler", None)
        if handler is not None:
            logging.getLogger("pmmrec").removeHandler(handler)
            handler.close()
            self._handler = None

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (flushed, so a crash keeps every finished line)."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            f.flush()

    def truncate_metrics(self, step: int) -> None:
        """On resume, drop lines written after the checkpoint's step (they will be written again)."""
        file = self.path / "metrics.jsonl"
        if not file.is_file():
            return
        kept = [line for line in file.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(file, "".join(line + "\n" for line in kept))

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.path / "results.json", json.dumps(results, indent=2) + "\n")
