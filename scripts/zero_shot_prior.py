#!/usr/bin/env python
"""Can a popularity prior make a zero-shot model beat most popular? The check behind the README's zero-shot finding.

A pretrained model ranks a domain it never trained on by ``user . item`` (zero-shot). Most popular ranks by the
domain's training counts. This script ranks by ``user . item + w * log(1 + count)``, for a grid of weights ``w``
(multiples ``r`` of a scale that puts the two terms on the same spread: the median over validation users of the
standard deviation of their scores over the catalogue, divided by that of ``log(1 + count)``), with the same full
ranking and seen items excluded as ``pmmrec evaluate``. ``r = 0`` is the zero-shot model, a very large ``r`` most
popular. The weight is chosen on validation; the JSON gives every weight's validation and test metrics, and the
chosen weight's test NDCG@10 minus popularity alone's (the largest weight), user by user, with a bootstrap interval.

    python scripts/zero_shot_prior.py --checkpoint runs/transfer/pretrain/rec/checkpoints/best.pt \
        --out zero-shot-prior.json data.domain=runs/transfer/data/genres/kids data.missing_image=blank

Reads the checkpoint and the domain only; trains nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from pmmrec.data.sources import eval_splits, load_split
from pmmrec.evaluation.evaluator import SplitEvaluator, user_vectors
from pmmrec.evaluation.metrics import metrics_from_ranks, per_user_metrics
from pmmrec.evaluation.ranking import EXCLUDE_HISTORY, PROTOCOLS, rank_targets
from pmmrec.models.features import run_feature_store
from pmmrec.models.loading import id_rows, load_model
from pmmrec.utils.io import atomic_write_text

RATIOS = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 1e4]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.domain=... (the new domain)")
    args = parser.parse_args()
    loaded = load_model(args.checkpoint, args.overrides)
    config, model = loaded.config, loaded.model
    split = load_split(config)
    device = torch.device("cpu")
    store = run_feature_store(config, model.item_encoder, split.titles, split.image_sources, device,
                              id_rows(loaded.item_ids, split.item_ids))
    valid, test = eval_splits(split, config.data.max_seq_len)
    evaluator = SplitEvaluator(store, split.num_items, valid, test, config.eval, device)
    items = evaluator.catalogue(model)  # (N+1, D)
    log_pop = torch.from_numpy(np.log1p(np.asarray(split.train_counts, dtype=np.float64))).float()
    log_pop[0] = 0.0  # padding
    with torch.no_grad():
        users = {name: user_vectors(model, items, seqs.inputs, config.eval.batch_size)
                 for name, seqs in (("valid", valid), ("test", test))}
        spread = float((users["valid"] @ items[1:].T).std(dim=1).median())
    scale = spread / (float(log_pop[1:].std()) or 1.0)  # all counts equal: popularity ranks nothing
    rows, test_ranks = [], []
    for ratio in RATIOS:
        # one more dimension: 1 for every user, w * log(1 + count) for every item
        weighted = torch.cat([items, (ratio * scale * log_pop)[:, None]], dim=1)
        row = {"ratio": ratio, "weight": ratio * scale}
        for name, seqs in (("valid", valid), ("test", test)):
            u = torch.cat([users[name], torch.ones(len(users[name]), 1)], dim=1)
            ranks = rank_targets(u, weighted, seqs.targets, seqs.histories)
            row[name] = {protocol: metrics_from_ranks(ranks[protocol], config.eval.ks) for protocol in PROTOCOLS}
            if name == "test":
                test_ranks.append(ranks[EXCLUDE_HISTORY])
        rows.append(row)
        print(f"r={ratio:g}: valid NDCG@10 {row['valid']['exclude_history']['NDCG@10']:.4f}, "
              f"test {row['test']['exclude_history']['NDCG@10']:.4f}")
    chosen = max(range(len(rows)), key=lambda i: rows[i]["valid"]["exclude_history"]["NDCG@10"])
    best = rows[chosen]
    paired = paired_difference(test_ranks[chosen], test_ranks[-1])
    print(f"chosen on validation: r={best['ratio']:g}, test NDCG@10 {best['test']['exclude_history']['NDCG@10']:.4f}; "
          f"minus popularity alone (r={RATIOS[-1]:g}), per user: {paired['mean']:+.4f}, 95% bootstrap interval "
          f"[{paired['ci95'][0]:+.4f}, {paired['ci95'][1]:+.4f}]")
    result = {"checkpoint": args.checkpoint, "domain": config.data.domain, "scale": scale, "rows": rows,
              "chosen_ratio": best["ratio"], "chosen_minus_popularity": paired}
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")


def paired_difference(ranks: torch.Tensor, others: torch.Tensor, k: int = 10, samples: int = 2000) -> dict:
    """Test NDCG@k of one ranking minus another's, user by user (0-based ranks, -1 = not ranked): the mean and a
    95% percentile bootstrap interval over users (seeded), so that a small difference is read with its noise."""
    metric = f"NDCG@{k}"
    diff = (per_user_metrics(ranks, k)[metric] - per_user_metrics(others, k)[metric]).numpy()
    rng = np.random.default_rng(0)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(samples)])
    return {"metric": metric, "users": len(diff), "mean": float(diff.mean()),
            "ci95": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}


if __name__ == "__main__":
    main()
