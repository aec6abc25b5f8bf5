"""Final-feature cache for fully frozen encoders (DESIGN section 9: ``trainable_layers: 0``).

A frozen encoder runs in eval mode without gradients, so its output for an item is the same at every step and
every epoch. It is computed once per item, batched, stored in float16 in the item feature store, and training and
evaluation then run only the projections, the fusion and the user encoder. The outputs equal the live forward up
to float16 rounding (tested). Encoders with trainable blocks are not cached here: their frozen *prefix* cache is
the speed issue's work.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from pmmrec.data.item_features import ItemFeatureStore
from pmmrec.models.item_encoder import ItemEncoder

log = logging.getLogger(__name__)


def _chunks(num_items: int, batch_size: int):
    for start in range(0, num_items + 1, batch_size):
        yield np.arange(start, min(start + batch_size, num_items + 1))


@torch.no_grad()
def cache_frozen_features(encoder: ItemEncoder, store: ItemFeatureStore | None, device: torch.device,
                          batch_size: int = 64, progress: bool = True) -> list[str]:
    """Attach the outputs of every fully frozen encoder of ``encoder`` to ``store``; returns what was cached."""
    if store is None:
        return []
    cached = []
    n = store.num_items
    if encoder.text is not None and encoder.text.trainable_layers == 0 and store.tokens is not None \
            and store.text_states is None:
        started = time.perf_counter()
        encoder.text.eval()
        width = max(int(store.tokens.lengths.max(initial=0)), 1)
        states = torch.zeros(n + 1, width, encoder.text.out_dim, dtype=torch.float16)  # (N+1, T_max, H)
        for items in tqdm(list(_chunks(n, batch_size)), desc="cache text features", disable=not progress or None,
                          leave=False):
            ids, mask = store.tokens.lookup(items)
            out = encoder.text(ids.to(device), mask.to(device))  # (b, T, H)
            states[torch.from_numpy(items), : out.shape[1]] = out.to("cpu", torch.float16)
        store.text_states = states
        cached.append("text")
        log.info("cached frozen text features: %d items x %d tokens x %d in %.1fs", n, width,
                 encoder.text.out_dim, time.perf_counter() - started)
    if encoder.vision is not None and encoder.vision.trainable_layers == 0 and store.images is not None \
            and store.image_states is None:
        started = time.perf_counter()
        encoder.vision.eval()
        states, present = None, torch.zeros(n + 1, dtype=torch.bool)
        for items in tqdm(list(_chunks(n, batch_size)), desc="cache image features",
                          disable=not progress or None, leave=False):
            images, has_image = store.images.lookup(items)
            out = encoder.vision(images.to(device))  # (b, P, H)
            if states is None:
                states = torch.zeros(n + 1, *out.shape[1:], dtype=torch.float16)  # (N+1, P, H)
            index = torch.from_numpy(items)
            states[index], present[index] = out.to("cpu", torch.float16), has_image
        store.image_states, store.has_image = states, present
        cached.append("vision")
        log.info("cached frozen image features: %d items x %d tokens x %d in %.1fs", n, states.shape[1],
                 states.shape[2], time.perf_counter() - started)
    return cached
