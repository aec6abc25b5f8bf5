"""``pmmrec bench encode``: how fast this machine turns a catalogue into item vectors, and restarts from the store.

docs/design.md §8. A catalogue of generated items (titles of 4 to 9 words, 256 x 256 product-like pictures drawn
as the built-in world draws them, half PNG and half JPEG) is given vectors twice through the path that
``pmmrec serve`` and ``pmmrec export-embeddings`` take (:func:`pmmrec.inference.catalogue_vectors.sync_catalogue`):

- **cold**: into an empty vector store: content digests, tokenising, image decoding and preprocessing, the text
  and image encoders, the fusion, and writing the store. ``items_per_s`` is this rate: what a first start (or an
  export, per process) costs.
- **warm**: again, with the store written: digests and reading the vectors back (what a restart costs).

Each case is one recipe's encoders with random projections and fusion (the cost does not depend on trained
values): ``default`` is ``configs/default.yaml`` (all-MiniLM-L6-v2 over 50 tokens, EfficientNet-Lite0 at 224 px,
merged attention, dim 256), ``cpu`` is ``configs/cpu.yaml`` (32 tokens, 128 px, dim 64). ``--quick`` runs the
tiny random encoders of ``configs/tiny.yaml`` over a few items, for tests.
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

from pmmrec.bench.measure import PeakMemory
from pmmrec.config import load_config
from pmmrec.data.domain import IMAGES_DB, read_domain, write_domain_tables
from pmmrec.data.image_db import write_image_db
from pmmrec.data.synth_assets import CATEGORIES, PROFILES, STYLES, draw_image
from pmmrec.inference.catalogue_vectors import CatalogueItems, model_key, sync_catalogue
from pmmrec.inference.vector_store import VectorStore
from pmmrec.models.pmmrec import PMMRec
from pmmrec.runtime.device import resolve_device
from pmmrec.utils.io import atomic_write_text
from pmmrec.utils.malloc import malloc_tuned

log = logging.getLogger(__name__)

# (name, items, overrides of the built-in defaults): the recipes' item encoders.
FULL = [("default", 1024, ["model.dim=256"]),
        ("cpu", 1024, ["text.max_tokens=32", "vision.image_size=128", "model.dim=64"])]
QUICK = [("tiny", 64, ["text.encoder=tiny", "vision.encoder=tiny", "text.max_tokens=16", "vision.image_size=32",
                       "model.dim=32"])]
IMAGE_SIZE = 256  # side of the generated pictures (the encoder's preprocessing resizes them)
BATCH_SIZE = 256  # Recommender.from_checkpoint's default


def write_catalogue(root: Path, num_items: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> Path:
    """A domain folder of ``num_items`` generated items (and one user, which a domain needs), with pictures of
    ``image_size`` x ``image_size`` pixels."""
    rng = np.random.default_rng(seed)
    categories, styles = list(CATEGORIES), list(STYLES.values())
    profile = PROFILES["toys"]
    ids = [f"b{i}" for i in range(1, num_items + 1)]
    kinds = rng.integers(len(categories), size=num_items)
    looks = rng.integers(len(styles), size=num_items)
    titles = []
    for kind, look in zip(kinds, looks, strict=True):
        words = list(rng.choice(CATEGORIES[categories[kind]], size=int(rng.integers(3, 7))))
        words += [str(rng.choice(styles[look].words)), str(rng.choice(profile.filler))]
        titles.append(" ".join(words))
    write_domain_tables(root, ids, titles, ["u1"], [ids[:3]])

    def images():
        for i, (kind, look) in enumerate(zip(kinds, looks, strict=True)):
            data, _ = draw_image(np.random.default_rng([seed, i]), int(kind), len(categories), styles[look], profile,
                                 image_size, 0.75, 8.0, 0.5)
            yield ids[i], data

    write_image_db(root / IMAGES_DB, images())
    return root


def _case(name: str, num_items: int, overrides: list[str], domain: Path, store: Path,
          device: torch.device) -> dict:
    config = load_config(None, overrides)
    torch.manual_seed(0)
    model = PMMRec(config, num_items).to(device).eval()
    catalogue = read_domain(domain, missing_image="error")
    items = CatalogueItems.from_domain(catalogue, None, "error")
    key = model_key(model, config, catalogue.item_ids)
    out = {"name": name, "items": num_items, "overrides": overrides, "dim": config.model.dim}
    for phase in ("cold", "warm"):
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            result = sync_catalogue(model, config, items, key, VectorStore(store), device, BATCH_SIZE)
            seconds = time.perf_counter() - started
        if result.encoded != (num_items if phase == "cold" else 0):  # the figures would measure something else
            raise RuntimeError(f"bench encode {name}: {phase} encoded {result.encoded} of {num_items} items")
        out[phase] = {"seconds": round(seconds, 3), "items_per_s": round(num_items / seconds, 1),
                      "encoded": result.encoded, **memory.to_dict()}
    out["items_per_s"] = out["cold"]["items_per_s"]
    log.info("bench encode %s: %d items, cold %.1f items/s (%.1f s), warm restart %.2f s", name, num_items,
             out["cold"]["items_per_s"], out["cold"]["seconds"], out["warm"]["seconds"])
    return out


def run(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    out = Path(getattr(args, "out", None) or "bench-encode.json")
    device = resolve_device("auto")
    started = time.perf_counter()
    cases = []
    with tempfile.TemporaryDirectory(prefix="pmmrec-bench-encode-") as tmp:
        domains: dict[int, Path] = {}
        for name, num_items, overrides in (QUICK if quick else FULL):
            if num_items not in domains:
                domains[num_items] = write_catalogue(Path(tmp) / f"catalogue-{num_items}", num_items)
            cases.append(_case(name, num_items, overrides, domains[num_items], Path(tmp) / f"store-{name}", device))
    result = {"benchmark": "encode", "quick": quick, "device": str(device), "torch_threads": torch.get_num_threads(),
              "malloc_tuned": malloc_tuned(), "platform": platform.platform(), "batch_size": BATCH_SIZE,
              "image_size": IMAGE_SIZE, "cases": cases, "items_per_s": cases[0]["items_per_s"],
              "warm_seconds": cases[0]["warm"]["seconds"], "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log.info("bench encode: %.1f items/s (%s encoders); written to %s", result["items_per_s"], cases[0]["name"], out)
    return result
