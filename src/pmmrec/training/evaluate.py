"""``pmmrec evaluate``: rebuild a model from a checkpoint and evaluate it with full ranking."""

from __future__ import annotations

import logging

from pmmrec.config import config_from_dict
from pmmrec.errors import PmmrecError
from pmmrec.models.pmmrec import PMMRec
from pmmrec.training import distributed
from pmmrec.training.checkpoint import load_checkpoint
from pmmrec.training.trainer import Trainer, load_split

log = logging.getLogger(__name__)


def evaluate_checkpoint(path: str, overrides: list[str] | tuple[str, ...] = (),
                        splits: list[str] | None = None) -> dict:
    """Metrics of the checkpoint at ``path`` on ``data.domain`` (the checkpoint's own, unless overridden)."""
    state = load_checkpoint(path)
    config = config_from_dict(state["config"], overrides, source=f"{path} (stored config)")
    split = load_split(config)
    if list(split.item_ids) != list(state["item_ids"]) and config.model.item_tower == "id":
        raise PmmrecError(f"{path}: an ID-based model can only be evaluated on the catalogue it was trained on")
    model = PMMRec(config, len(state["item_ids"]) if config.model.item_tower == "id" else len(split.item_ids))
    model.load_state_dict(state["model"])
    try:
        trainer = Trainer(config, model=model, split=split)  # under torchrun: sharded over the processes
        item_vecs = trainer.catalogue()  # encoded once, shared by the splits
        return {which: trainer.evaluate(which, item_vecs) for which in (splits or ["valid", "test"])}
    finally:
        distributed.cleanup()
