"""``pmmrec evaluate``: a checkpoint's model, evaluated with full ranking on a domain (no trainer involved)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pmmrec.config import dump_config
from pmmrec.data.sources import eval_splits, load_split
from pmmrec.errors import PmmrecError
from pmmrec.evaluation.evaluator import SplitEvaluator
from pmmrec.models.features import run_feature_store
from pmmrec.models.loading import id_rows, load_model
from pmmrec.runtime import distributed
from pmmrec.runtime.device import resolve_device
from pmmrec.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def write_evaluation(out: str | Path, config, results: dict) -> None:
    """A run folder for an evaluation: ``config.yaml`` and ``results.json``, written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")


def evaluate_checkpoint(path: str, overrides: list[str] | tuple[str, ...] = (),
                        splits: list[str] | None = None, out: str | Path | None = None) -> dict:
    """Metrics of the checkpoint at ``path`` on ``data.domain`` (the checkpoint's own, unless overridden);
    under torchrun the catalogue and the users are sharded over the processes.

    ``out``: also write a run folder there (``config.yaml`` and ``results.json`` with the metrics, the users and
    items evaluated, and ``evaluated``: the checkpoint, the domain and whether it is one the model never trained
    on, i.e. zero-shot), so that ``pmmrec report`` lists the evaluation beside trained runs.
    """
    if out is not None and (Path(out) / "results.json").is_file():
        raise PmmrecError(f"--out {out} already holds results.json; choose another folder (or delete it)")
    try:
        loaded = load_model(path, overrides)
        config, model = loaded.config, loaded.model
        split = load_split(config)
        if list(split.item_ids) != loaded.item_ids and config.model.item_tower == "id":
            raise PmmrecError(f"{path}: an ID-based model can only be evaluated on the catalogue it was trained on")
        device = resolve_device(config.train.device)
        model.to(device)
        # The frozen encoder parts run through the feature cache, as in training, so a checkpoint evaluates to
        # the numbers its run reported.
        store = run_feature_store(config, model.item_encoder, split.titles, split.image_sources, device,
                                  id_rows(loaded.item_ids, split.item_ids))
        valid, test = eval_splits(split, config.data.max_seq_len)
        evaluator = SplitEvaluator(store, split.num_items, valid, test, config.eval, device)
        item_vecs = evaluator.catalogue(model)  # encoded once, shared by the splits
        results = {which: evaluator.evaluate(model, which, item_vecs) for which in (splits or ["valid", "test"])}
        if out is not None and distributed.is_main():
            seen = {Path(d).resolve() for d in loaded.trained_on}
            evaluated = {"checkpoint": str(path), "domain": config.data.domain, "trained_on": loaded.trained_on,
                         "zero_shot": Path(config.data.domain).resolve() not in seen}
            write_evaluation(out, config, {**results, "num_items": split.num_items, "num_users": split.num_users,
                                           "data": {"history": config.data.history}, "evaluated": evaluated})
        return results
    finally:
        distributed.cleanup()
