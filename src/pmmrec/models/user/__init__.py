"""User encoders: a sequence of item vectors -> one state per position (PMMRec §III-B).

Every user encoder has the same call, ``forward(item_embs (B, L, D), mask (B, L)) -> (B, L, D)``, with
``mask`` 1 at real items and sequences left-padded. It is causal (the state at position l depends on items
0..l only), its states at padded positions are zero, and prepending padding does not change the states of
real positions. Each class has ``from_config(cfg: ModelConfig, max_seq_len: int)``; ``model.user_encoder``
picks one through :data:`USER_ENCODERS`.
"""

from __future__ import annotations

from torch import nn

from pmmrec.config import ModelConfig
from pmmrec.errors import PmmrecError
from pmmrec.models.user.gru4rec import GRU4Rec
from pmmrec.models.user.nextitnet import NextItNet
from pmmrec.models.user.sasrec import SASRec

USER_ENCODERS: dict[str, type[nn.Module]] = {
    "sasrec": SASRec,  # paper / reference default
    "nextitnet": NextItNet,
    "gru4rec": GRU4Rec,
}


def build_user_encoder(cfg: ModelConfig, max_seq_len: int) -> nn.Module:
    """The user encoder named by ``cfg.user_encoder``, for sequences of at most ``max_seq_len`` items."""
    if cfg.user_encoder not in USER_ENCODERS:
        raise PmmrecError(f"unknown model.user_encoder {cfg.user_encoder!r}; "
                          f"choose one of {sorted(USER_ENCODERS)}")
    return USER_ENCODERS[cfg.user_encoder].from_config(cfg, max_seq_len)


__all__ = ["USER_ENCODERS", "GRU4Rec", "NextItNet", "SASRec", "build_user_encoder"]
