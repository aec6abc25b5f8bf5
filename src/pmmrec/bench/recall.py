"""``pmmrec bench recall``: recall@10 of the approximate indexes against exact search (docs/design.md §8).

The catalogue is the one ``pmmrec bench serve`` serves (:func:`pmmrec.bench.catalogue.synthetic_recommender`:
synthetic vectors and a random SASRec user encoder), ``random`` or ``clustered``
(:func:`~pmmrec.bench.catalogue.catalogue_vectors`). Random vectors are the hardest case for an index and not what a
trained model gives; clustered ones are nearer to it. Neither is a trained catalogue, so recall on a real one
should be checked with :func:`measure_recall` on its own :class:`~pmmrec.inference.Recommender`.

Histories are drawn as ``bench serve`` draws them (5 to 50 random catalogue items); both recommenders answer
through :meth:`~pmmrec.inference.Recommender.recommend_many` (history excluded, k = 10), so what is measured is
the whole approximate path (over-fetched candidates, exact re-ranking, history excluded) against the exact one.
``--sweep`` also measures each index at several search efforts (HNSW ``efSearch``, IVF ``nprobe``) on one
build. Times in the JSON are only meaningful on an idle machine; recall does not depend on load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pmmrec.bench.catalogue import CATALOGUES, K, histories, measure_recall, synthetic_recommender
from pmmrec.errors import PmmrecError
from pmmrec.inference.ann import INDEX_KINDS, IndexSettings
from pmmrec.utils.io import atomic_write_text

log = logging.getLogger(__name__)

FULL = {"items": 100_000, "queries": 1000}
QUICK = {"items": 5_000, "queries": 100}
SWEEP = {"hnsw": ("ef_search", (64, 128, 256, 512, 1024)), "ivf": ("nprobe", (16, 32, 64, 128, 256))}


def run_case(num_items: int, catalogue: str, kinds: list[str], queries: int, sweep: bool,
             settings: IndexSettings | None = None) -> dict:
    """One catalogue: every kind of ``kinds`` built once, its recall measured (at each sweep effort)."""
    settings = settings or IndexSettings()
    from pmmrec.inference.recommender import Recommender

    exact = synthetic_recommender(num_items, catalogue=catalogue, index="exact")
    history_lists = histories(num_items, queries)
    out = {}
    for kind in kinds:
        rec = Recommender(exact.model, exact.config, exact.catalogue, index=kind, index_settings=settings)
        index = rec.approximate_index
        entry = {"index": index.describe, "build_s": round(index.build_s, 1),
                 **measure_recall(exact, rec, history_lists)}
        if sweep:  # the same build searched harder or less hard
            name, efforts = SWEEP[kind]
            entry["sweep"] = []
            for effort in efforts:
                index.set_search(**{name: effort})
                entry["sweep"].append({name: effort, **measure_recall(exact, rec, history_lists)})
        out[kind] = entry
        log.info("bench recall: %s, %d %s items: %s", kind, num_items, catalogue, entry)
    return out


def run(args) -> dict:
    sizes = dict(QUICK if getattr(args, "quick", False) else FULL)
    if getattr(args, "items", None):
        sizes["items"] = args.items
    if sizes["items"] < 2:
        raise PmmrecError(f"--items must be at least 2, got {sizes['items']}")
    catalogues = [args.catalogue] if getattr(args, "catalogue", None) else list(CATALOGUES)
    index = getattr(args, "index", None)
    if index not in (None, "hnsw", "ivf"):
        raise PmmrecError(f"bench recall measures an approximate index: --index hnsw or ivf, got {index!r} "
                          f"(of {', '.join(INDEX_KINDS)})")
    kinds = [index] if index else ["hnsw", "ivf"]
    out = Path(args.out or "bench-recall.json")
    result = {"benchmark": "recall", "items": sizes["items"], "queries": sizes["queries"], "k": K,
              "history_length": "uniform 5..50, excluded", "settings": IndexSettings().__dict__,
              "note": "synthetic catalogues (see pmmrec.bench.catalogue.catalogue_vectors); times are only meaningful "
                      "on an idle machine",
              "catalogues": {c: run_case(sizes["items"], c, kinds, sizes["queries"], getattr(args, "sweep", False))
                             for c in catalogues}}
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    for catalogue, entries in result["catalogues"].items():
        for entry in entries.values():
            print(f"{sizes['items']:,} {catalogue} items, {entry['index']}: recall@{K} {entry[f'recall@{K}']}")
    print(f"wrote {out}")
    return result
