"""ItemEncoder: title and image -> one item vector. The ONLY item path (training, evaluation, serving).

PMMRec §III-A: a text encoder and a vision encoder (pretrained, top blocks fine-tuned) produce token states,
each projected to ``model.dim``; a fusion module turns the two token sequences into one vector. Text-only and
vision-only items (``model.modality``) skip the fusion and mean-pool their one modality, as the reference code
does. ``model.item_tower: id`` replaces all of it by an ID embedding table (the SASRec baseline), which is the
one item tower that cannot transfer to new items. ``content+id`` adds a learned ID embedding to the content vector:
initialised at zero (training starts from the content model) and left out per item with probability
``model.id_dropout`` in training, so the content part alone stays a good item vector. Item number 0 (no ID: an
item added after training, or one of a domain the model never saw) is its content vector alone.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        self.id_dropout = model.id_dropout
        # None at 0, so that a model without it draws no random numbers for it (runs stay as they were)
        self.feature_dropout = nn.Dropout(model.feature_dropout) if model.feature_dropout > 0 else None
        if self.tower == "content+id":  # built after the content parts, which then start as a content tower's
            self.id_embedding = nn.Embedding(num_items + 1, model.dim, padding_idx=0)
            nn.init.zeros_(self.id_embedding.weight)

    @property
    def uses_text(self) -> bool:
        return self.tower != "id" and self.modality in ("multimodal", "text")

    @property
    def uses_vision(self) -> bool:
        return self.tower != "id" and self.modality in ("multimodal", "vision")

    @property
    def pools_first(self) -> bool:
        """Whether each modality is reduced to one vector before fusion (all but the token-level fusions)."""
        return self.fusion is None or not isinstance(self.fusion, TOKEN_LEVEL)

    def modality_tokens(self, items: ItemInputs) -> ModalityTokens:
        """Projected per-modality token states, before fusion (what NICL aligns, pooled).

        When the fusion only needs one vector per modality, the encoder states are pooled *before* the
        projection: a linear map commutes with a (masked) mean, so the result is the same and the projection runs
        on one vector instead of T or P tokens (49x fewer for EfficientNet's image tokens).
        """
        pool = self.pools_first
        out = ModalityTokens()
        if self.text is not None:
            mask = items.text_mask
            # (N, T, H). With a cached frozen-prefix output only the trainable top blocks run (none when frozen).
            states = self.text.top(items.text_states.float(), mask) if items.text_states is not None else \
                self.text(items.text_ids, mask)
            if pool:
                states, mask = masked_mean(states, mask)[:, None], mask.new_ones(len(states), 1)
            out.text, out.text_mask = self.text_proj(self._drop(states)), mask  # (N, T, D), or (N, 1, D) pooled
        if self.vision is not None:
            states = self.vision.top(items.image_states.float()) if items.image_states is not None else \
                self.vision(items.images)  # (N, P, H)
            if pool:
                states = states.mean(dim=1, keepdim=True)  # (N, 1, H)
            out.image = self.vision_proj(self._drop(states))  # (N, P, D), or (N, 1, D) pooled
            out.image_mask = torch.ones(out.image.shape[:2], dtype=torch.long, device=out.image.device)
        return out

    def _drop(self, states: Tensor) -> Tensor:
        """``model.feature_dropout`` on an encoder's output, before its projection (training only)."""
        return states if self.feature_dropout is None else self.feature_dropout(states)

    def fuse(self, tokens: ModalityTokens) -> Tensor:
        """Per-modality tokens -> (N, D) item vectors (mean pooling when there is one modality)."""
        if self.fusion is None:
            return tokens.pooled_text() if tokens.text is not None else tokens.pooled_image()
        return self.fusion(tokens.text, tokens.text_mask, tokens.image, tokens.image_mask)

    def forward(self, items: ItemInputs) -> Tensor:
        """Any flat set of N items -> (N, D) item vectors."""
        if self.tower == "id":
            return self.id_embedding(items.items)
        return self.add_ids(self.fuse(self.modality_tokens(items)), items.items)

    def add_ids(self, vectors: Tensor, items: Tensor) -> Tensor:
        """``content+id``: content vectors (N, D) plus the ID embeddings of ``items`` (N,) (0 = no ID: nothing
        added), each left out with probability ``id_dropout`` in training. Other towers: ``vectors`` unchanged."""
        if self.tower != "content+id":
            return vectors
        ids = self.id_embedding(items.to(vectors.device))  # (N, D)
        if self.training and self.id_dropout > 0:
            keep = torch.rand(len(ids), 1, device=ids.device) >= self.id_dropout  # (N, 1)
            ids = ids * keep
        return vectors + ids


@dataclass
class ModalityTokens:
    """Projected token states of each modality present (None where the modality is off)."""

    text: Tensor | None = None  # (N, T, D)
    text_mask: Tensor | None = None  # (N, T)
    image: Tensor | None = None  # (N, P, D)
    image_mask: Tensor | None = None  # (N, P)

    def pooled_text(self) -> Tensor:
        return masked_mean(self.text, self.text_mask)  # (N, D)

    def pooled_image(self) -> Tensor:
        return masked_mean(self.image, self.image_mask)  # (N, D)
