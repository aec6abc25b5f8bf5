"""``pmmrec evaluate``: a checkpoint's model, evaluated with full ranking on a domain (no trainer involved)."""

from __future__ import annotations

import logging

from pmmrec.data.sources import eval_splits, load_split
from pmmrec.errors import PmmrecError
from pmmrec.evaluation.evaluator import SplitEvaluator
from pmmrec.models.features import run_feature_store
from pmmrec.models.loading import id_rows, load_model
from pmmrec.runtime import distributed
from pmmrec.runtime.device import resolve_device

log = logging.getLogger(__name__)


def evaluate_checkpoint(path: str, overrides: list[str] | tuple[str, ...] = (),
                        splits: list[str] | None = None) -> dict:
    """Metrics of the checkpoint at ``path`` on ``data.domain`` (the checkpoint's own, unless overridden);
    under torchrun the catalogue and the users are sharded over the processes."""
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
        return {which: evaluator.evaluate(model, which, item_vecs) for which in (splits or ["valid", "test"])}
    finally:
        distributed.cleanup()
