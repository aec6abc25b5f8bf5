"""Cached outputs of the frozen part of each encoder, in memory and on disk, reused across runs (docs/design.md §9).

PMMRec fine-tunes only the top blocks of its text and vision encoders (§IV-A). Everything below them (the
embeddings and the frozen blocks, the *frozen prefix*) computes the same function of the item at every step,
every epoch and every run with the same weights, so its output is computed once per item (batched, no grad),
stored in float16, and training, evaluation and serving run only the trainable top blocks on it
(:meth:`TextEncoder.top`, :meth:`VisionEncoder.top`). With ``trainable_layers: 0`` the whole encoder is frozen and
its final token states are cached; then only the projections, the fusion and the user encoder run.

*Semantics.* The model's outputs with the cache equal the full forward up to float16 rounding of the cached
states (tested, and so are training curves). The one difference in principle is that no dropout can act inside
cached blocks, since their output is computed once; pmmrec already runs frozen blocks in eval mode (no dropout,
BatchNorm on its pretrained statistics; :mod:`pmmrec.models.encoders.freeze`) with or without the cache, so in
pmmrec the two paths train the same model. (The reference code left dropout on in its frozen blocks.)

*On disk* (``train.cache_dir``, default ``<run.dir>/cache``) the features live under
``features/<kind>-<fingerprint>/``, where the fingerprint covers everything that determines them except the item
itself: the cache format, the encoder's class, a hash of every tensor of the frozen part (weights and buffers),
the split point (frozen depth) and, for images, the preprocessing. Inside, *shards* hold rows keyed by a digest
of the item's content (its token ids, or its encoded image bytes): ``<shard>.keys.npy`` (M, 16) uint8 and
``<shard>.states.npy`` (M, ...) float16, each written atomically, keys last, so a shard is complete once its
keys file exists. A run looks every item up by its digest, reads (memory-maps) the rows found, computes only the
missing items and appends them as a new shard. So nine runs on one target domain, or transfers from checkpoints
whose frozen weights are the unchanged pretrained ones, compute each item's features once; a changed weight
(another fingerprint) or a changed title or image (another digest) is a miss. Concurrent runs are safe: shards
are immutable, named by their content, and a duplicate row is harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pmmrec.config import Config
from pmmrec.data.item_features import ImageRef, ItemFeatureStore
from pmmrec.models.item_encoder import ItemEncoder
from pmmrec.models.layers import masked_mean
from pmmrec.pretrained import tokenizer_dir
from pmmrec.runtime import distributed
from pmmrec.runtime.feature_files import CacheJob, fill, tensors_fingerprint

log = logging.getLogger(__name__)


def build_feature_store(config: Config, encoder: ItemEncoder, titles: Sequence[str],
                        image_refs: Sequence[ImageRef] | None, *, cache_dir: str | Path | None = None,
                        image_cache_items: int = 4096, id_rows: np.ndarray | None = None) -> ItemFeatureStore | None:
    """The model inputs of a catalogue, for exactly the modalities ``encoder`` reads (None for the ID tower).

    The one builder of item features: training, evaluation and the Recommender all call it, so the tokenizer,
    the title settings and the image preprocessing are always the ones the encoder was built with. ``id_rows``
    (see :func:`pmmrec.models.loading.id_rows`): a ``content+id`` model serving another catalogue.
    """
    if not (encoder.uses_text or encoder.uses_vision):
        return None
    store = ItemFeatureStore.build(
        titles, image_refs if encoder.uses_vision else None,
        tokenizer_path=tokenizer_dir(config.text.encoder) if encoder.uses_text else None,
        max_tokens=config.text.max_tokens, lowercase=config.text.lowercase,
        preprocessor=encoder.vision.preprocessor() if encoder.uses_vision else None,
        missing_image=config.data.missing_image, cache_dir=cache_dir, image_cache_items=image_cache_items)
    store.id_rows = id_rows
    return store


def run_feature_store(config: Config, encoder: ItemEncoder, titles: Sequence[str],
                      image_refs: Sequence[ImageRef] | None, device: torch.device,
                      id_rows: np.ndarray | None = None) -> ItemFeatureStore | None:
    """A run's feature store with its frozen encoder outputs attached (training and ``pmmrec evaluate``).

    Features are cached in ``train.cache_dir`` (default ``<run.dir>/cache``); under torchrun rank 0 computes and
    stores them first, then the other ranks read them.
    """
    cache_dir = Path(config.train.cache_dir) if config.train.cache_dir else Path(config.run.dir) / "cache"
    with distributed.main_first():
        store = build_feature_store(config, encoder, titles, image_refs, cache_dir=cache_dir, id_rows=id_rows)
        cache_frozen_features(encoder, store, device, config.eval.batch_size, cache_dir=cache_dir,
                              prefixes=config.train.feature_cache, progress=distributed.is_main())
    pool_frozen_states(encoder, store)
    return store


def pool_frozen_states(encoder: ItemEncoder, store: ItemFeatureStore | None, chunk: int = 4096) -> list[str]:
    """Average the cached token states of fully frozen encoders once, when the fusion pools them anyway.

    With ``pools_first`` (every fusion but the token-level ones) and an encoder with no trainable block, each step
    would gather T (text) or P (image) cached states per item only to average them before the projection: on
    MovieLens-1M's catalogue that is ~0.5 GB gathered per step. The average is taken here instead, with the same
    masked mean, and the store keeps one (1, H) float32 vector per item. Returns the modalities pooled.
    """
    if store is None or not encoder.pools_first:
        return []
    pooled = []
    if store.text_states is not None and not store.text_pooled and encoder.text.trainable_layers == 0:
        rows = []
        for start in range(0, len(store.text_states), chunk):
            items = np.arange(start, min(start + chunk, len(store.text_states)))
            mask = store.tokens.lookup(items)[1]  # (b, width)
            rows.append(masked_mean(store.text_states[start:start + len(items), :mask.shape[1]].float(), mask))
        store.text_states, store.text_pooled = torch.cat(rows)[:, None], True  # (N+1, 1, H)
        pooled.append("text")
    if store.image_states is not None and store.image_states.dim() == 3 and store.image_states.shape[1] > 1 \
            and encoder.vision.trainable_layers == 0:
        store.image_states = torch.cat([part.float().mean(dim=1, keepdim=True)
                                        for part in store.image_states.split(chunk)])  # (N+1, 1, H)
        pooled.append("vision")
    return pooled


def frozen_weights_digest(model: nn.Module, trainable: Iterable[nn.Module]) -> str:
    """:func:`~pmmrec.runtime.feature_files.tensors_fingerprint` of ``model`` without the tensors of its ``trainable`` blocks: those change in
    training (BatchNorm statistics included), and the frozen prefix does not depend on them."""
    skip = {id(t) for block in trainable for t in block.state_dict(keep_vars=True).values()}
    return tensors_fingerprint((name, t) for name, t in model.state_dict(keep_vars=True).items() if id(t) not in skip)


def _level(encoder) -> str:
    return "final" if encoder.trainable_layers == 0 else f"prefix-{encoder.first_trainable}"


def _text_job(encoder: ItemEncoder, store: ItemFeatureStore, device: torch.device) -> CacheJob:
    text = encoder.text

    def compute(items: np.ndarray) -> torch.Tensor:
        ids, mask = store.tokens.lookup(items)
        mask = mask.to(device)
        states = text.prefix(ids.to(device), mask)  # (b, T, H)
        # Positions past a title's end are zeroed: they are masked everywhere, and a row must not depend on
        # the batch it was computed in (a cached row and a fresh one are then bit-identical).
        return states * mask[..., None]

    top = text.blocks()[text.first_trainable:]
    fingerprint = {"kind": "text", "level": _level(text), "encoder": type(text.model).__name__,
                   "weights": frozen_weights_digest(text.model, top), "blocks": len(text.blocks()),
                   "max_tokens": int(store.tokens.ids.shape[1]), "pad_id": int(store.tokens.pad_id)}
    width = max(int(store.tokens.lengths.max(initial=0)), 1)
    return CacheJob("text", fingerprint, store.tokens.content_digests(), compute, width=width)


def _vision_job(encoder: ItemEncoder, store: ItemFeatureStore, device: torch.device) -> CacheJob:
    vision = encoder.vision

    def compute(items: np.ndarray) -> torch.Tensor:
        images, _ = store.images.lookup(items)
        return vision.prefix(images.to(device)).contiguous()  # (b, P, H) or a CNN's (b, C, h, w)

    digests, present = store.images.content_digests()
    top = vision.blocks()[vision.first_trainable:]
    fingerprint = {"kind": "vision", "level": _level(vision), "encoder": type(vision.backbone).__name__,
                   "weights": frozen_weights_digest(vision.backbone, top), "blocks": len(vision.blocks()),
                   "preprocessing": repr(vision.preprocessor())}
    return CacheJob("vision", fingerprint, digests, compute, has_image=present)


@torch.no_grad()
def cache_frozen_features(encoder: ItemEncoder, store: ItemFeatureStore | None, device: torch.device,
                          batch_size: int = 64, progress: bool = True,
                          cache_dir: str | Path | None = None, prefixes: bool = True) -> list[str]:
    """Attach the output of each encoder's frozen part to ``store``; returns the modalities cached.

    A fully frozen encoder (``trainable_layers: 0``) caches its final token states; one with trainable top
    blocks caches its frozen prefix (``prefixes=False`` leaves those encoders uncached, running every block at
    every step). ``cache_dir`` (``train.cache_dir``): read features from there where their fingerprint matches,
    store the ones computed; None keeps them in memory only.
    """
    if store is None:
        return []
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    jobs = []
    text, vision = encoder.text, encoder.vision
    if text is not None and (prefixes or text.trainable_layers == 0) and store.tokens is not None \
            and store.text_states is None:
        jobs.append(_text_job(encoder, store, device))
    if vision is not None and (prefixes or vision.trainable_layers == 0) and store.images is not None \
            and store.image_states is None:
        jobs.append(_vision_job(encoder, store, device))
    done = []
    for job in jobs:
        started = time.perf_counter()
        module = encoder.text if job.kind == "text" else encoder.vision
        was_training = module.training
        module.eval()
        try:
            states, reused, computed = fill(job, cache_dir, batch_size, progress)
        finally:
            module.train(was_training)
        if job.kind == "text":
            store.text_states = states
        else:
            store.image_states = states
            store.has_image = torch.from_numpy(job.has_image)
        where = f" in {cache_dir / 'features' / job.namespace}" if cache_dir is not None else ""
        shape = "x".join(str(d) for d in states.shape[1:])
        if computed == 0:
            log.info("reused cached %s features of %d items (%s each)%s", job.kind, reused, shape, where)
        else:
            log.info("cached %s features: %d items computed, %d reused (%s each) in %.1fs%s", job.kind, computed,
                     reused, shape, time.perf_counter() - started, where)
        done.append(job.kind)
    return done
