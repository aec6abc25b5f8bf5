"""Non-learned reference points, evaluated with the same full ranking as the models (``pmmrec baseline pop``).

The learned baseline, ID-based SASRec, is a model like the others: ``pmmrec baseline sasrec`` (or ``pmmrec train
model.item_tower=id``).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pmmrec.config import Config, dump_config
from pmmrec.data.datasets import EvalSequences
from pmmrec.data.sources import eval_splits, load_split
from pmmrec.errors import PmmrecError
from pmmrec.evaluation.ranking import evaluate_rankings
from pmmrec.utils.io import atomic_write_text


def most_popular(train_counts: np.ndarray, sequences: EvalSequences, ks: list[int]) -> dict:
    """Rank every item by its training frequency (the same list for every user), both protocols."""
    item_vecs = torch.as_tensor(np.asarray(train_counts, dtype=np.float64), dtype=torch.float64)[:, None]
    item_vecs[0] = 0.0  # (N+1, 1): a score per item; row 0 is padding
    users = torch.ones(len(sequences), 1, dtype=torch.float64)  # (U, 1)
    return evaluate_rankings(users, item_vecs, sequences.targets, sequences.histories, ks)


def run_most_popular(config: Config, counts_from: str | Path | None = None) -> dict:
    """``pmmrec baseline pop``: most-popular on ``data.domain``, evaluated like a model; writes ``run.dir``
    (``config.yaml`` and ``results.json``, so that ``pmmrec report`` shows it beside the models).

    ``counts_from``: rank by the training counts of that domain instead (items matched by id; an item it does not
    hold counts 0), e.g. a sample's counts ranking the users the sample did not draw."""
    run = Path(config.run.dir)
    if (run / "results.json").is_file():
        raise PmmrecError(f"run.dir {run} already holds a run; set another run.dir (or delete that folder)")
    started = time.perf_counter()
    split = load_split(config, images=False)  # popularity reads no image
    counts, label = split.train_counts, "most popular"
    if counts_from is not None:
        known = load_split(replace(config, data=replace(config.data, domain=str(counts_from))), images=False)
        count = dict(zip(known.item_ids, known.train_counts[1:].tolist(), strict=True))
        counts = np.array([0] + [count.get(item, 0) for item in split.item_ids], dtype=np.float64)
        label = f"most popular by the training counts of {counts_from}"
    valid, test = eval_splits(split, config.data.max_seq_len)
    results = {"baseline": label,
               "valid": most_popular(counts, valid, config.eval.ks),
               "test": most_popular(counts, test, config.eval.ks),
               "num_items": split.num_items, "num_users": split.num_users,
               "data": {"history": config.data.history}}
    results["seconds"] = round(time.perf_counter() - started, 3)
    run.mkdir(parents=True, exist_ok=True)
    dump_config(config, run / "config.yaml")
    atomic_write_text(run / "results.json", json.dumps(results, indent=2) + "\n")
    return results
