"""PMMRec: item encoder + user encoder (PMMRec, ICDE 2024, §III).

The model knows nothing about ranks, devices or losses (STYLE rule 3): ``encode_items`` turns item inputs into
vectors, ``encode_sequences`` turns sequences of item vectors into user states, ``score`` compares them.
Losses live in ``pmmrec.objectives``.
"""

from __future__ import annotations

from torch import Tensor, nn

from pmmrec.config import Config
from pmmrec.data.batch import ItemInputs
from pmmrec.errors import ConfigError
from pmmrec.models.item_encoder import ItemEncoder
from pmmrec.models.user import build_user_encoder
from pmmrec.objectives.heads import ContrastiveHead, NoiseClassifier


class PMMRec(nn.Module):
    def __init__(self, config: Config, num_items: int):
        super().__init__()
        self.item_encoder = ItemEncoder(config, num_items)
        self.user_encoder = build_user_encoder(config.model, config.data.max_seq_len)
        # Heads of the auxiliary objectives (saved with the model, never transferred: they serve pretraining).
        self.heads = nn.ModuleDict()
        use, dim = set(config.objectives.use), config.model.dim
        if "nicl" in use:
            if not (self.item_encoder.uses_text and self.item_encoder.uses_vision):
                raise ConfigError("objectives.use includes nicl, which aligns text and image: it needs "
                                  "model.modality=multimodal and model.item_tower=content")
            self.heads["nicl_text"] = ContrastiveHead.from_config(dim, config.objectives.nicl)
            self.heads["nicl_image"] = ContrastiveHead.from_config(dim, config.objectives.nicl)
        if "nid" in use:
            self.heads["nid"] = NoiseClassifier(dim)

    def encode_items(self, items: ItemInputs) -> Tensor:
        return self.item_encoder(items)  # (N, D)

    def encode_sequences(self, item_embs: Tensor, mask: Tensor) -> Tensor:
        return self.user_encoder(item_embs, mask)  # (B, L, D) -> (B, L, D)

    @staticmethod
    def score(user_states: Tensor, item_embs: Tensor) -> Tensor:
        return user_states @ item_embs.T  # (B, D) x (N, D) -> (B, N)
