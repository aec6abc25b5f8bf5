"""``pmmrec bench epoch``: one training epoch of a real domain with the real-data CPU recipe, timed.

Whole histories, every position a target (``train.windows: all``), the catalogue-wide softmax: on MovieLens-1M
that is about a million targets an epoch. For each variant (ID SASRec, PMMRec multimodal) the JSON gives the
feature-cache build (encoding every item once through the frozen encoders) and the epoch itself separately, the
targets per second and the peak RSS of the whole measurement.

    pmmrec bench epoch --domain data/ml1m --out bench-epoch.json [--variant sasrec multimodal]
                       [--config configs/real-cpu.yaml]
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch

from pmmrec.bench.measure import PeakMemory, timed
from pmmrec.config import load_config
from pmmrec.data.synth import SynthConfig, synthesize_world
from pmmrec.errors import PmmrecError
from pmmrec.runtime.device import resolve_device
from pmmrec.training.api import build_trainer
from pmmrec.utils.io import atomic_write_text
from pmmrec.utils.malloc import malloc_tuned

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
VARIANTS = {"sasrec": ["model.item_tower=id"], "multimodal": ["data.missing_image=blank"]}


def _epoch(recipe: Path, overrides: list[str], max_steps: int | None) -> dict:
    device = resolve_device("auto")
    with PeakMemory(device) as memory:
        trainer, build_s = timed(lambda: build_trainer(load_config(recipe, overrides)), device)
        trainer.model.train()
        steps = targets = 0
        started = time.perf_counter()
        for batch in trainer.batches.epoch(0):
            trainer.train_step(batch)
            steps += 1
            targets += int((batch.items[:, :-1] != 0).sum())
            if max_steps is not None and steps >= max_steps:
                break
        epoch_s = time.perf_counter() - started
    return {"setup_s": round(build_s, 2), "epoch_s": round(epoch_s, 2), "steps": steps,
            "steps_per_epoch": len(trainer.batches), "targets": targets,
            "targets_per_s": round(targets / epoch_s, 1), "windows": len(trainer.batches.windows),
            "num_items": len(trainer.item_ids), **memory.to_dict()}


def run(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    out = Path(getattr(args, "out", None) or "bench-epoch.json")
    variants = getattr(args, "variant", None) or list(VARIANTS)
    started = time.perf_counter()
    result = {"benchmark": "epoch", "quick": quick, "torch_threads": torch.get_num_threads(),
              "malloc_tuned": malloc_tuned(), "platform": platform.platform(), "variants": {}}
    with tempfile.TemporaryDirectory(prefix="pmmrec-bench-epoch-") as tmp:
        if quick:  # the built-in world's target and tiny encoders: checks the pipeline, its times mean nothing
            synthesize_world(Path(tmp) / "world", SynthConfig(seed=0, quick=True))
            domain, recipe, extra, max_steps = Path(tmp) / "world" / "target", CONFIGS / "tiny.yaml", [
                "train.windows=all", "objectives.rec.negatives=catalogue"], 3
        else:
            if not getattr(args, "domain", None):
                raise PmmrecError("pmmrec bench epoch needs --domain FOLDER (a prepared domain, e.g. MovieLens-1M)")
            recipe = Path(getattr(args, "config", None) or CONFIGS / "real-cpu.yaml")
            if not recipe.is_file():
                raise PmmrecError(f"{recipe} not found: pass the real-data recipe with --config configs/real-cpu.yaml")
            domain, extra, max_steps = Path(args.domain), [], None
        result["domain"], result["recipe"] = str(domain), recipe.name
        for name in variants:
            overrides = [f"data.domain={domain}", f"run.dir={Path(tmp) / name}",
                         f"train.cache_dir={Path(tmp) / 'cache'}", "seed=0", *extra, *VARIANTS[name]]
            log.info("bench epoch: %s", name)
            result["variants"][name] = _epoch(recipe, overrides, max_steps)
    result["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    for name, r in result["variants"].items():
        log.info("bench epoch %s: %.1f s (%d steps, %.0f targets/s), set-up incl. feature cache %.1f s, peak RSS "
                 "%.0f MB", name, r["epoch_s"], r["steps"], r["targets_per_s"], r["setup_s"], r["peak_rss_mb"])
    return result
