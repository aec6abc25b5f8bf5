"""``pmmrec bench train``: the naive training step (reference-code behaviour) against ours, in one run (docs/design.md §9).

Both paths are the same code (the :class:`~pmmrec.training.trainer.Trainer`'s training step) on the same
config, data, batches and seed, so the loss of the first batch (computed without dropout, whose random draws
depend on tensor shapes) must agree, to float16 rounding of the cached states; the paths differ only in the
data path and in what the item encoder computes:

- **naive** (the reference code): every item occurrence of every window is encoded (no unique items), titles are
  padded to ``text.max_tokens``, each image is decoded with the image database reopened for it, and every frozen
  encoder block runs at every step (``train.feature_cache=false``, ``WindowCollator(naive=True)``,
  ``ItemFeatureStore.naive``);
- **optimised** (the default): each distinct item of the batch once, titles padded to the batch's longest, and
  the frozen prefix of each encoder read from the cache, so only the trainable top blocks run;
- **floor**: forward and backward of the trainable top blocks alone on the batch's distinct items (what the
  optimised step cannot avoid), measured in the same run.

The default sizes use the default pretrained encoders (all-MiniLM-L6-v2 and EfficientNet-Lite0, top 2 blocks
trainable, merged attention, batch 32, max_seq_len 20) on a source domain of the built-in world; ``--quick``
uses tiny random encoders and the quick world and runs in seconds.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pmmrec.bench.measure import PeakMemory, timed
from pmmrec.config import load_config
from pmmrec.data.datasets import WindowCollator
from pmmrec.data.synth import SynthConfig, synthesize_world
from pmmrec.runtime.device import resolve_device
from pmmrec.training.api import build_trainer
from pmmrec.training.trainer import Trainer
from pmmrec.utils.io import atomic_write_text
from pmmrec.utils.malloc import malloc_tuned

log = logging.getLogger(__name__)

DOMAIN = "books"  # a source domain of the built-in world (thousands of users, Zipf popularity)
FULL = {"batch_size": 32, "max_seq_len": 20, "naive_steps": 2, "steps": 9, "warmup": 1,
        "overrides": ["text.encoder=minilm", "vision.encoder=efficientnet-lite0", "text.trainable_layers=2",
                      "vision.trainable_layers=2", "text.max_tokens=50", "vision.image_size=224", "model.dim=256",
                      "model.fusion=merged_attention"]}
QUICK = {"batch_size": 8, "max_seq_len": 10, "naive_steps": 3, "steps": 4, "warmup": 1,
         "overrides": ["text.encoder=tiny", "vision.encoder=tiny", "text.trainable_layers=1",
                       "vision.trainable_layers=1", "text.tiny_layers=2", "vision.tiny_layers=2", "text.max_tokens=16",
                       "vision.image_size=32", "model.dim=32", "model.fusion=merged_attention"]}
LOSS_RTOL = 1e-4  # the target for the agreement of the first-step losses


def _steps(trainer: Trainer, plan: list[list[int]], naive: bool, warmup: int) -> dict:
    """Train on ``plan``'s batches; per-step wall time (data path included), losses and item counts."""
    device = trainer.device
    collate = WindowCollator(trainer.batches.store, naive=naive)
    trainer.model.train()
    losses, seconds, slots, encoded = [], [], [], []
    for users in plan:
        def step(users=users):
            batch = collate([trainer.batches.windows[u] for u in users]).to(device)
            loss, _ = trainer.train_step(batch)
            return loss, batch

        (loss, batch), secs = timed(step, device)
        losses.append(loss)
        seconds.append(secs)
        slots.append(int((batch.items != 0).sum()))
        encoded.append(len(batch.unique))
        log.info("%s step %d: %.2fs, loss %.6f", "naive" if naive else "optimised", len(losses), secs, loss)
    measured = slice(warmup, None) if len(plan) > warmup else slice(None)
    step_s = float(np.mean(seconds[measured]))
    return {"steps_measured": len(seconds[measured]), "step_s": round(step_s, 4),
            "steps_per_s": round(1.0 / step_s, 4),
            "items_per_s": round(float(np.sum(slots[measured]) / np.sum(seconds[measured])), 2),
            "items_encoded_per_step": round(float(np.mean(encoded)), 1),
            "item_slots_per_step": round(float(np.mean(slots)), 1),
            "losses": losses, "step_seconds": [round(s, 4) for s in seconds]}


@torch.no_grad()
def _first_loss(trainer: Trainer, users: list[int], naive: bool) -> float:
    """The loss of the first batch before any update, without dropout (whose draws depend on tensor shapes, which
    the two paths do not share), so that the naive and optimised values are comparable."""
    trainer.model.eval()
    try:
        batch = WindowCollator(trainer.batches.store, naive=naive)([trainer.batches.windows[u] for u in users])
        return float(trainer.loss(batch.to(trainer.device))[0])
    finally:
        trainer.model.train()


def _floor(trainer: Trainer, plan: list[list[int]], warmup: int) -> dict:
    """Forward + backward of the trainable top blocks alone on each batch's distinct items."""
    encoder, device = trainer.model.item_encoder, trainer.device
    collate = WindowCollator(trainer.batches.store)
    seconds = []
    for users in plan:
        inputs = collate([trainer.batches.windows[u] for u in users]).inputs.to(device)

        def tops(inputs=inputs):
            total = 0.0
            if encoder.text is not None:
                total = total + encoder.text.top(inputs.text_states.float(), inputs.text_mask).sum()
            if encoder.vision is not None:
                total = total + encoder.vision.top(inputs.image_states.float()).sum()
            total.backward()

        seconds.append(timed(tops, device)[1])
    trainer.model.zero_grad(set_to_none=True)
    measured = seconds[warmup:] if len(seconds) > warmup else seconds
    return {"step_s": round(float(np.mean(measured)), 4)}


def run(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    sizes = QUICK if quick else FULL
    out = Path(getattr(args, "out", None) or "bench-train.json")
    device = resolve_device("auto")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pmmrec-bench-train-") as tmp:
        world = Path(tmp) / "world"
        synthesize_world(world, SynthConfig(seed=0, quick=quick, sources=(DOMAIN,)))
        common = [*sizes["overrides"], f"data.domain={world / DOMAIN}", f"train.batch_size={sizes['batch_size']}",
                  f"data.max_seq_len={sizes['max_seq_len']}", f"train.device={device}", "objectives.use=[rec]",
                  f"train.cache_dir={Path(tmp) / 'cache'}", "data.num_workers=0", "seed=0"]

        # Naive first: its per-image database reopening is real only while no other handle holds the database.
        with PeakMemory(device) as naive_mem:
            trainer = build_trainer(load_config(None, [*common, "train.feature_cache=false", f"run.dir={tmp}/naive"]))
            trainer.batches.store.naive = True
            plan = trainer.batches.plan(0)[: max(sizes["naive_steps"], sizes["steps"])]
            naive_loss = _first_loss(trainer, plan[0], naive=True)
            naive = _steps(trainer, plan[: sizes["naive_steps"]], naive=True, warmup=sizes["warmup"])
        num_items = len(trainer.item_ids)
        del trainer  # PeakMemory collects and trims the heap before the next phase

        with PeakMemory(device) as opt_mem:
            trainer, cache_s = timed(lambda: build_trainer(load_config(None, [*common, f"run.dir={tmp}/optimised"])),
                                     device)
            optimised_loss = _first_loss(trainer, plan[0], naive=False)
            optimised = _steps(trainer, plan[: sizes["steps"]], naive=False, warmup=sizes["warmup"])
            floor = _floor(trainer, plan[: sizes["steps"]], warmup=sizes["warmup"])

    rel = abs(naive_loss - optimised_loss) / max(abs(naive_loss), 1e-12)
    config = trainer.config
    result = {
        "benchmark": "train", "quick": quick, "device": str(device), "torch_threads": torch.get_num_threads(),
        "malloc_tuned": malloc_tuned(),
        "platform": platform.platform(),
        "config": {"text": config.text.encoder, "vision": config.vision.encoder,
                   "text_trainable_layers": config.text.trainable_layers,
                   "vision_trainable_layers": config.vision.trainable_layers, "fusion": config.model.fusion,
                   "batch_size": config.train.batch_size, "max_seq_len": config.data.max_seq_len,
                   "dim": config.model.dim, "domain": DOMAIN, "num_items": num_items},
        "naive": {**naive, **naive_mem.to_dict()},
        "optimised": {**optimised, **opt_mem.to_dict(), "cache_build_s": round(cache_s, 2)},
        "floor": floor,
        "speedup": round(optimised["items_per_s"] / naive["items_per_s"], 2),
        "ratio_to_floor": round(optimised["step_s"] / floor["step_s"], 2),
        "first_loss": {"naive": naive_loss, "optimised": optimised_loss, "rel_diff": float(f"{rel:.3g}"),
                       "agree": rel <= LOSS_RTOL},
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log.info("bench train: speedup %.1fx (naive %.2f s/step, optimised %.2f s/step, floor %.2f s), first losses "
             "agree to %.2g relative; written to %s", result["speedup"], naive["step_s"], optimised["step_s"],
             floor["step_s"], rel, out)
    return result
