"""transfer_config: what a target run takes from the checkpoint's stored config and what from its recipe."""

from __future__ import annotations

import logging

from pmmrec.config import load_config
from pmmrec.training.transfer import transfer_config


def _checkpoint(*overrides: str) -> dict:
    stored = load_config(None, ["text.encoder=tiny", "vision.encoder=tiny", "model.dim=16", "model.fusion=sum",
                                "data.max_seq_len=7", *overrides])
    return {"config": stored.to_dict()}


def test_architecture_is_inherited_but_feature_dropout_is_the_recipes(caplog):
    checkpoint = _checkpoint("model.feature_dropout=0.5", "model.dropout=0.3")
    with caplog.at_level(logging.INFO, logger="pmmrec.training.transfer"):
        config = transfer_config(checkpoint, None, [], "ckpt.pt")
    assert "model.feature_dropout: 0.5 in ckpt.pt, 0.0 for this run (not inherited by a transfer)" in caplog.text
    assert (config.model.dim, config.model.fusion, config.text.encoder, config.data.max_seq_len) == (16, "sum",
                                                                                                     "tiny", 7)
    assert config.model.dropout == 0.3  # the user encoder's dropout is part of what moves
    assert config.model.feature_dropout == 0.0  # a pretraining regulariser: not carried into fine-tuning
    assert transfer_config(checkpoint, None, ["model.feature_dropout=0.2"], "ckpt.pt").model.feature_dropout == 0.2
