"""The tensors that describe a flat set of items, as the item encoder consumes them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class ItemInputs:
    """Inputs of ``ItemEncoder`` for N items (any flat set: a batch's unique items, a catalogue chunk).

    ``text_ids``/``text_mask`` are padded to the longest title among these N items (capped by text.max_tokens);
    ``images`` is None when the vision modality is off.
    """

    items: torch.Tensor  # (N,) item numbers (1-based; 0 = padding)
    text_ids: torch.Tensor | None = None  # (N, T) token ids
    text_mask: torch.Tensor | None = None  # (N, T) 1 = real token
    images: torch.Tensor | None = None  # (N, 3, S, S) preprocessed pixels
    has_image: torch.Tensor | None = None  # (N,) False where a blank image stands in
    # Outputs of an encoder's frozen part (its frozen-prefix output, or its final states when it is fully frozen),
    # cached once per item: when present the item encoder runs only the trainable top blocks on them.
    # ``text_states`` goes with ``text_mask``; ``image_states`` replaces ``images``.
    text_states: torch.Tensor | None = None  # (N, T, H_text)
    image_states: torch.Tensor | None = None  # (N, P, H_image) tokens, or (N, C, h, w) a CNN's feature map

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ItemInputs:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return ItemInputs(**moved)

    def __len__(self) -> int:
        return int(self.items.shape[0])
