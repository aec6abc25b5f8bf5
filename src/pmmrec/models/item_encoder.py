"""ItemEncoder: title and image -> one item vector. The ONLY item path (training, evaluation, serving).

PMMRec §III-A: a text encoder and a vision encoder (pretrained, top blocks fine-tuned) produce token states,
each projected to ``model.dim``; a fusion module turns the two token sequences into one vector. Text-only and
vision-only items (``model.modality``) skip the fusion and mean-pool their one modality, as the reference code
does. ``model.item_tower: id`` replaces all of it by an ID embedding table (the SASRec baseline), which is the
one item tower that cannot transfer to new items.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pmmrec.config import Config
from pmmrec.data.batch import ItemInputs
from pmmrec.models.encoders.image import build_vision_encoder
from pmmrec.models.encoders.text import build_text_encoder
from pmmrec.models.fusion import build_fusion
from pmmrec.models.fusion.attention import CoAttentionFusion, MergedAttentionFusion
from pmmrec.models.layers import masked_mean

TOKEN_LEVEL = (MergedAttentionFusion, CoAttentionFusion)  # fusions that read every token


class ItemEncoder(nn.Module):
    def __init__(self, config: Config, num_items: int):
        super().__init__()
        model = config.model
        self.dim, self.modality, self.tower = model.dim, model.modality, model.item_tower
        self.id_embedding = self.text = self.vision = self.text_proj = self.vision_proj = self.fusion = None
        if self.tower == "id":
            self.id_embedding = nn.Embedding(num_items + 1, model.dim, padding_idx=0)
            nn.init.normal_(self.id_embedding.weight, std=0.02)
            with torch.no_grad():
                self.id_embedding.weight[0].zero_()
            return
        if self.uses_text:
            self.text = build_text_encoder(config.text)
            self.text_proj = nn.Linear(self.text.out_dim, model.dim)
        if self.uses_vision:
            self.vision = build_vision_encoder(config.vision)
            self.vision_proj = nn.Linear(self.vision.out_dim, model.dim)
        if self.modality == "multimodal":
            self.fusion = build_fusion(model)

    @property
    def uses_text(self) -> bool:
        return self.tower == "content" and self.modality in ("multimodal", "text")

    @property
    def uses_vision(self) -> bool:
        return self.tower == "content" and self.modality in ("multimodal", "vision")

    @property
    def pools_first(self) -> bool:
        """Whether each modality is reduced to one vector before fusion (all but the token-level fusions)."""
        return self.fusion is None or not isinstance(self.fusion, TOKEN_LEVEL)

    def forward(self, items: ItemInputs) -> Tensor:
        """Any flat set of N items -> (N, D) item vectors."""
        if self.id_embedding is not None:
            return self.id_embedding(items.items)
        # When the fusion only needs one vector per modality, pool the encoder states *before* projecting:
        # a linear map commutes with a (masked) mean, so the result is the same and the projection runs on
        # one vector instead of T or P tokens (49x fewer for EfficientNet's image tokens).
        pool = self.pools_first
        text = image = text_mask = image_mask = None
        if self.text is not None:
            states = items.text_states.float() if items.text_states is not None else \
                self.text(items.text_ids, items.text_mask)  # (N, T, H): cached when the encoder is frozen
            text_mask = items.text_mask
            if pool:
                states, text_mask = masked_mean(states, text_mask)[:, None], text_mask.new_ones(len(states), 1)
            text = self.text_proj(states)  # (N, T, D), or (N, 1, D) pooled
        if self.vision is not None:
            states = items.image_states.float() if items.image_states is not None else self.vision(items.images)
            if pool:
                states = states.mean(dim=1, keepdim=True)  # (N, 1, H)
            image = self.vision_proj(states)  # (N, P, D), or (N, 1, D) pooled
            image_mask = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)  # (N, P)
        if self.fusion is None:
            return masked_mean(text, text_mask) if text is not None else image.mean(dim=1)
        return self.fusion(text, text_mask, image, image_mask)
