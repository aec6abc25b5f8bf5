"""``pmmrec bench eval``: full-ranking throughput against the raw matrix-multiply + top-K floor (docs/design.md §7, §9).

Users and items are random vectors (the ranking cost does not depend on where the vectors come from). For each
case the benchmark times, in the same run and on the same tensors:

- **ours**: :func:`pmmrec.evaluation.ranking.evaluate_rankings`, what every evaluation runs: the rank of each
  user's target among all items under both protocols (history excluded and included), in ``user_chunk x
  item_chunk`` blocks so that memory stays bounded whatever the catalogue size;
- **recommend**: :func:`pmmrec.evaluation.ranking.topk_items`, the running top-K over item chunks with the
  history excluded (what recommending runs);
- **recommend_shortlist** (CPU): the same top-K through :class:`pmmrec.inference.scoring.ShortlistScorer`, the
  certified bfloat16 shortlist the Recommender uses where bfloat16 products are faster (``bf16_faster``), with
  the number of users its certificate sent back to the float32 path;
- **floor**: the bare torch operation with no history, no target and no metrics, in whichever of two forms
  is faster on this machine: ``(users @ items.T).topk(K)`` per user chunk over the whole catalogue
  (``floor_whole``), or the same per ``user_chunk x item_chunk`` block without merging the blocks' top-K
  (``floor_chunked``: on a CPU, a 256 x 1,000,000 score matrix no longer fits in cache and its top-K is slower
  than many small ones).

``ratio_to_floor`` = time of ours / time of the (faster) floor for the largest case. Peak memory (RSS, and CUDA
max allocated on a GPU) is measured per phase.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch

from pmmrec.bench.measure import PeakMemory, timed
from pmmrec.evaluation.ranking import evaluate_rankings, topk_items
from pmmrec.inference.scoring import ShortlistScorer, bf16_pays
from pmmrec.runtime.device import resolve_device
from pmmrec.utils.io import atomic_write_text
from pmmrec.utils.malloc import malloc_tuned

log = logging.getLogger(__name__)

# (items, users, dim): the last case is the headline (1,000,000 items x 10,000 users must stay under 4 GB).
FULL = [(100_000, 2_000, 256), (1_000_000, 10_000, 64)]
QUICK = [(20_000, 500, 32)]
HISTORY = 20  # history items per user (excluded from the ranking)
K = 20  # the largest cutoff of eval.ks
USER_CHUNK, ITEM_CHUNK = 256, 65536  # eval.batch_size and eval.item_chunk defaults


def _floor(users: torch.Tensor, items: torch.Tensor, item_chunk: int | None = None) -> None:
    """Matmul + top-K per user chunk, over the whole catalogue or per item chunk (``item_chunk``)."""
    body = items[1:]  # row 0 is padding
    step = item_chunk or len(body)
    for u0 in range(0, len(users), USER_CHUNK):
        for i0 in range(0, len(body), step):
            (users[u0:u0 + USER_CHUNK] @ body[i0:i0 + step].T).topk(K, dim=1)


def _case(num_items: int, num_users: int, dim: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    items = torch.randn(num_items + 1, dim, generator=generator).to(device)
    items[0] = 0
    users = torch.randn(num_users, dim, generator=generator).to(device)
    targets = torch.randint(1, num_items + 1, (num_users,), generator=generator).to(device)
    histories = torch.randint(1, num_items + 1, (num_users, HISTORY), generator=generator).to(device)
    # Warm-up on a slice (thread pools, allocator), not timed.
    evaluate_rankings(users[:8], items, targets[:8], histories[:8], [K], user_chunk=USER_CHUNK,
                      item_chunk=ITEM_CHUNK)
    _floor(users[:8], items)
    _floor(users[:8], items, ITEM_CHUNK)

    out = {"items": num_items, "users": num_users, "dim": dim}
    with PeakMemory(device) as mem:
        _, seconds = timed(lambda: evaluate_rankings(users, items, targets, histories, [5, 10, K],
                                                     user_chunk=USER_CHUNK, item_chunk=ITEM_CHUNK), device)
    out["ours"] = {"seconds": round(seconds, 3), "users_per_s": round(num_users / seconds, 1), **mem.to_dict()}
    with PeakMemory(device) as mem:  # each phase starts from a collected, trimmed heap
        _, seconds = timed(lambda: topk_items(users, items, K, exclude=histories, user_chunk=USER_CHUNK,
                                              item_chunk=ITEM_CHUNK), device)
    out["recommend"] = {"seconds": round(seconds, 3), "users_per_s": round(num_users / seconds, 1), **mem.to_dict()}
    if device.type == "cpu":  # what the Recommender runs on a CPU where bfloat16 products pay
        with PeakMemory(device) as mem:
            scorer, build_s = timed(lambda: ShortlistScorer(items), device)
            _, seconds = timed(lambda: scorer.topk(users, K, histories), device)
        out["recommend_shortlist"] = {"seconds": round(seconds, 3), "users_per_s": round(num_users / seconds, 1),
                                      "build_s": round(build_s, 3), "fallback_users": scorer.fallbacks,
                                      "bf16_faster": bf16_pays(items.shape[1]), **mem.to_dict()}
    for name, chunk in (("floor_whole", None), ("floor_chunked", ITEM_CHUNK)):
        with PeakMemory(device) as mem:
            _, seconds = timed(lambda chunk=chunk: _floor(users, items, chunk), device)
        out[name] = {"seconds": round(seconds, 3), "users_per_s": round(num_users / seconds, 1), **mem.to_dict()}
    out["floor"] = {"form": min(("floor_whole", "floor_chunked"), key=lambda name: out[name]["seconds"])}
    out["floor"].update(out[out["floor"]["form"]])
    out["ratio_to_floor"] = round(out["ours"]["seconds"] / out["floor"]["seconds"], 3)
    out["recommend_ratio_to_floor"] = round(out["recommend"]["seconds"] / out["floor"]["seconds"], 3)
    if "recommend_shortlist" in out:
        out["recommend_shortlist_ratio_to_floor"] = round(out["recommend_shortlist"]["seconds"]
                                                          / out["floor"]["seconds"], 3)
    out["input_mb"] = round((items.numel() + users.numel()) * 4 / 2**20, 1)
    log.info("bench eval %d items x %d users (dim %d): ours %.0f users/s, floor %.0f users/s, ratio %.2f, "
             "peak RSS %.0f MB", num_items, num_users, dim, out["ours"]["users_per_s"], out["floor"]["users_per_s"],
             out["ratio_to_floor"], out["ours"]["peak_rss_mb"])
    return out


def run(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    out = Path(getattr(args, "out", None) or "bench-eval.json")
    device = resolve_device("auto")
    started = time.perf_counter()
    cases = [_case(*case, device) for case in (QUICK if quick else FULL)]
    headline = cases[-1]
    result = {"benchmark": "eval", "quick": quick, "device": str(device), "torch_threads": torch.get_num_threads(),
              "malloc_tuned": malloc_tuned(), "platform": platform.platform(), "user_chunk": USER_CHUNK,
              "item_chunk": ITEM_CHUNK,
              "history": HISTORY, "k": K, "cases": cases,
              "ratio_to_floor": headline["ratio_to_floor"],
              "users_per_s": headline["ours"]["users_per_s"],
              "peak_rss_mb": max(c["ours"]["peak_rss_mb"] for c in cases),
              "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log.info("bench eval: ratio to floor %.2f (%d items x %d users); written to %s", result["ratio_to_floor"],
             headline["items"], headline["users"], out)
    return result
