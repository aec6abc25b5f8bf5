"""Transfer: initialise a target-domain model from a pretrained checkpoint, by part and by modality.

PMMRec §III-D: any part of the pretrained model moves to a new domain: the item encoder (text and/or vision
branch, projections, fusion), the user encoder, or both. Nothing here depends on item ids, so a target whose
items were never seen starts from pretrained weights. Loading is *model weights only* (resume is a different
operation) and is reported tensor by tensor: loaded, skipped (in the checkpoint but not wanted or not in this
model) and re-initialised (in this model but not transferred). Parts not transferred keep the fresh weights the
model was built with, which are deterministic given the seed. A requested part that loads nothing is an error
(the reference code silently loads nothing for its user encoder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from pmmrec.config import Config, load_config
from pmmrec.errors import PmmrecError
from pmmrec.models.loading import read_checkpoint
from pmmrec.models.pmmrec import FROZEN_DIGEST, PMMRec

log = logging.getLogger(__name__)

PARTS = {"full": ("item_encoder.", "user_encoder."), "item_encoder": ("item_encoder.",),
         "user_encoder": ("user_encoder.",)}
ARCHITECTURE = ("text", "vision", "model")  # config sections a transfer inherits from the checkpoint
# ... except these pretraining-only regularisers: model.feature_dropout kept in fine-tuning slowed the target runs
# of the MovieLens-1M study so much that transfer ended below transfer without it (README); the recipe decides.
NOT_INHERITED = {"model": ("feature_dropout",)}


@dataclass
class TransferReport:
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint tensor -> why it was not loaded
    reinitialised: list[str] = field(default_factory=list)  # model tensors left at their fresh init

    def summary(self) -> str:
        return (f"transfer: {len(self.loaded)} tensors loaded, {len(self.skipped)} skipped, "
                f"{len(self.reinitialised)} re-initialised")

    def to_dict(self) -> dict[str, Any]:
        return {"loaded": self.loaded, "skipped": self.skipped, "reinitialised": self.reinitialised}


def transfer_config(checkpoint: dict[str, Any], recipe: str | None, overrides: list[str] | tuple[str, ...],
                    source: str) -> Config:
    """The target run's config: the checkpoint's architecture (text, vision, model but ``NOT_INHERITED``,
    data.max_seq_len) under the recipe and the overrides (which may still change e.g. ``model.modality``);
    everything else from the recipe."""
    stored = {key: {k: v for k, v in checkpoint["config"][key].items() if k not in NOT_INHERITED.get(key, ())}
              for key in ARCHITECTURE}
    stored["data"] = {"max_seq_len": checkpoint["config"]["data"]["max_seq_len"]}  # sizes SASRec's positions
    config = load_config(recipe, overrides, base=stored, base_source=f"{source} (stored config)")
    for section, keys in NOT_INHERITED.items():
        for key in keys:
            pretrained, now = checkpoint["config"][section].get(key), getattr(getattr(config, section), key)
            if pretrained is not None and pretrained != now:
                log.info("%s.%s: %s in %s, %s for this run (not inherited by a transfer)", section, key, pretrained,
                         source, now)
    return config


def load_parts(model: PMMRec, state: dict[str, torch.Tensor], parts: str) -> TransferReport:
    """Copy the tensors of ``parts`` from ``state`` into ``model`` where names and shapes match."""
    prefixes = PARTS[parts]
    own = model.state_dict()
    report = TransferReport()
    # A compact checkpoint leaves out frozen pretrained weights; this model loads them from the same files,
    # which the stored digest verifies. They count as loaded.
    verified = model.verify_omitted(state, [p for p in model.pretrained_prefixes if p.startswith(prefixes)])
    for name, tensor in state.items():
        if name.startswith(FROZEN_DIGEST + "."):
            continue
        if not name.startswith(prefixes):
            report.skipped[name] = "part not transferred"
        elif name.startswith("item_encoder.id_embedding."):
            report.skipped[name] = "item IDs belong to the source catalogue (content+id transfers its content part)"
        elif name not in own:
            report.skipped[name] = "not in this model (e.g. a modality it does not use)"
        elif own[name].shape != tensor.shape:
            raise PmmrecError(f"cannot transfer {name}: shape {tuple(tensor.shape)} in the checkpoint, "
                              f"{tuple(own[name].shape)} in this model (architecture settings differ)")
        else:
            own[name] = tensor
            report.loaded.append(name)
    report.loaded += verified
    loaded = set(report.loaded)
    report.reinitialised = [name for name in own if name not in loaded]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in loaded):
            raise PmmrecError(f"transfer.parts={parts}: nothing of {prefix.rstrip('.')} could be loaded from the "
                              "checkpoint (was it trained with the same item tower and modality?)")
    model.load_state_dict(own)
    return report


def init_from(model: PMMRec, path: str, parts: str) -> TransferReport:
    """Load ``parts`` of the checkpoint at ``path`` into ``model`` (weights only) and log the report."""
    if model.item_encoder.tower == "id" and "item_encoder." in PARTS[parts]:
        raise PmmrecError("an ID-based item tower cannot be transferred to new items; use model.item_tower=content "
                          "or transfer.parts=user_encoder")
    report = load_parts(model, read_checkpoint(path).state["model"], parts)
    log.info("%s from %s", report.summary(), path)
    for name, why in sorted(report.skipped.items()):
        log.debug("skipped %s: %s", name, why)
    return report
