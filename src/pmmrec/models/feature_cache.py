"""Cached outputs of the frozen part of each encoder, in memory and on disk, reused across runs (DESIGN section 9).

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

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pmmrec.data.item_features import DIGEST_BYTES, ItemFeatureStore
from pmmrec.models.item_encoder import ItemEncoder
from pmmrec.utils.io import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the meaning of a cached row changes


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of named tensors: their names, dtypes, shapes and values (memory layout and device do not matter:
    a channels-last copy hashes the same)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(named, key=lambda pair: pair[0]):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def weights_digest(modules: Iterable[nn.Module]) -> str:
    """:func:`tensors_digest` of every parameter and buffer of ``modules``."""
    return tensors_digest((f"{i}.{name}", t) for i, module in enumerate(modules)
                          for name, t in module.state_dict().items())


def _digest_keys(digests: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in np.ascontiguousarray(digests, dtype=np.uint8)]


class FeatureFiles:
    """Per-item encoder outputs under ``root/<namespace>/``, in immutable shards keyed by item content digests."""

    def __init__(self, root: str | Path, namespace: str, meta: dict):
        self.path = Path(root) / "features" / namespace
        self.meta = meta

    def shards(self) -> list[tuple[list[bytes], np.ndarray]]:
        """Every complete shard: (its keys, its states memory-mapped read-only)."""
        out = []
        for keys_file in sorted(self.path.glob("*.keys.npy")):
            states_file = keys_file.with_name(keys_file.name.removesuffix(".keys.npy") + ".states.npy")
            try:
                keys = np.load(keys_file)
                states = np.load(states_file, mmap_mode="r")
            except (OSError, ValueError) as e:
                log.warning("ignoring an unreadable feature cache shard %s (%s)", keys_file, e)
                continue
            if keys.ndim != 2 or keys.shape[1] != DIGEST_BYTES or len(states) != len(keys):
                log.warning("ignoring a malformed feature cache shard %s", keys_file)
                continue
            out.append((_digest_keys(keys), states))
        return out

    def write_shard(self, digests: np.ndarray, states: np.ndarray) -> Path:
        """Store new rows as one shard, named after its keys (the same rows give the same name)."""
        self.path.mkdir(parents=True, exist_ok=True)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            atomic_write_text(meta_file, json.dumps(self.meta, indent=2, sort_keys=True) + "\n")
        name = hashlib.blake2b(np.ascontiguousarray(digests).tobytes(), digest_size=12).hexdigest()
        with atomic_file(self.path / f"{name}.states.npy", "wb") as f:
            np.save(f, states)
        with atomic_file(self.path / f"{name}.keys.npy", "wb") as f:  # last: the shard is complete
            np.save(f, np.ascontiguousarray(digests, dtype=np.uint8))
        return self.path / f"{name}.keys.npy"


@dataclass
class CacheJob:
    """What to cache for one encoder: per-row content digests, the row shape, and how to compute rows."""

    kind: str  # "text" or "vision" (names the namespace and the log lines)
    fingerprint: dict  # everything but the item that determines a row (hashed into the namespace)
    digests: np.ndarray  # (N+1, DIGEST_BYTES) uint8, row = item number
    compute: Callable[[np.ndarray], torch.Tensor]  # item numbers (b,) -> (b, *row shape) float, no grad
    width: int | None = None  # text: rows are padded to this many tokens (the longest title)
    has_image: np.ndarray | None = None  # vision: (N+1,) bool, False where a blank image stands in

    @property
    def namespace(self) -> str:
        blob = json.dumps(self.fingerprint, sort_keys=True).encode()
        return f"{self.kind}-{hashlib.blake2b(blob, digest_size=12).hexdigest()}"


def _fill(job: CacheJob, cache_dir: Path | None, batch_size: int, progress: bool) -> tuple[torch.Tensor, int, int]:
    """(N+1, ...) float16 rows of every item: read from ``cache_dir`` where present, computed (and stored) otherwise.

    Returns the rows, the number of items reused and the number of distinct items computed.
    """
    n_rows = len(job.digests)
    keys = _digest_keys(job.digests)
    files = FeatureFiles(cache_dir, job.namespace, {"format": FORMAT_VERSION, **job.fingerprint}) \
        if cache_dir is not None else None
    found: dict[bytes, tuple[int, int]] = {}
    shards = files.shards() if files is not None else []
    for s, (shard_keys, _) in enumerate(shards):
        for row, key in enumerate(shard_keys):
            found.setdefault(key, (s, row))
    out: torch.Tensor | None = None

    def allocate(row_shape: tuple[int, ...]) -> torch.Tensor:
        shape = (job.width, *row_shape[1:]) if job.width is not None else row_shape
        return torch.zeros(n_rows, *shape, dtype=torch.float16)

    # Reuse: gather the rows found, shard by shard (sorted rows read a memory map sequentially).
    hits = [(found[k], item) for item, k in enumerate(keys) if k in found]
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for (s, row), item in hits:
        by_shard.setdefault(s, []).append((row, item))
    for s, pairs in by_shard.items():
        pairs.sort()
        states = shards[s][1]
        if out is None:
            out = allocate(states.shape[1:])
        rows = np.array([p[0] for p in pairs])
        items = torch.tensor([p[1] for p in pairs])
        w = min(states.shape[1], out.shape[1]) if job.width is not None else None
        block = np.asarray(states[rows] if w is None else states[rows, :w])
        if w is None:
            out[items] = torch.from_numpy(block)
        else:
            out[items, :w] = torch.from_numpy(block)

    # Compute: each distinct missing content once, in batches; duplicates (equal titles/images) share it.
    missing: dict[bytes, list[int]] = {}
    for item, k in enumerate(keys):
        if k not in found:
            missing.setdefault(k, []).append(item)
    firsts = np.array([items[0] for items in missing.values()], dtype=np.int64)
    new_rows: list[np.ndarray] = []
    batches = [firsts[i:i + batch_size] for i in range(0, len(firsts), batch_size)]
    for batch in tqdm(batches, desc=f"cache {job.kind} features", disable=not progress or None, leave=False):
        rows = job.compute(batch).to("cpu", torch.float16)  # (b, *row shape)
        if out is None:
            out = allocate(tuple(rows.shape[1:]))
        if job.width is not None:
            out[torch.from_numpy(batch), : rows.shape[1]] = rows
        else:
            out[torch.from_numpy(batch)] = rows
        new_rows.append(rows.numpy())
    if out is None:  # an empty catalogue: nothing found, nothing computed
        out = torch.zeros(n_rows, 0, dtype=torch.float16)
    for items in missing.values():
        if len(items) > 1:
            out[torch.tensor(items[1:])] = out[items[0]].clone()
    if files is not None and new_rows:
        if job.width is not None:  # text: pad every batch to the widest, so the shard is one array
            width = max(r.shape[1] for r in new_rows)
            new_rows = [np.pad(r, [(0, 0), (0, width - r.shape[1])] + [(0, 0)] * (r.ndim - 2)) for r in new_rows]
        files.write_shard(job.digests[firsts], np.concatenate(new_rows))
    return out, len(hits), len(firsts)


def frozen_weights_digest(model: nn.Module, trainable: Iterable[nn.Module]) -> str:
    """:func:`tensors_digest` of ``model`` without the tensors of its ``trainable`` blocks: those change in
    training (BatchNorm statistics included), and the frozen prefix does not depend on them."""
    skip = {id(t) for block in trainable for t in block.state_dict(keep_vars=True).values()}
    return tensors_digest((name, t) for name, t in model.state_dict(keep_vars=True).items() if id(t) not in skip)


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
            states, reused, computed = _fill(job, cache_dir, batch_size, progress)
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
