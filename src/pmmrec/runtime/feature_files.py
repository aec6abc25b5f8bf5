"""The on-disk feature cache: per-item encoder outputs in immutable shards keyed by item content digests.

What is cached and why is the business of :mod:`pmmrec.models.features` (the frozen part of each encoder,
docs/design.md §9); this module only stores and finds rows. Under ``<cache_dir>/features/<kind>-<fingerprint>/``,
where the fingerprint covers everything that determines a row except the item itself (the cache format, the
encoder's class, a hash of its frozen tensors, the split point, the preprocessing), *shards* hold rows keyed by
a digest of the item's content (its token ids, or its encoded image bytes): ``<shard>.keys.npy`` (M, 16) uint8
and ``<shard>.states.npy`` (M, ...) float16, each written atomically, keys last, so a shard is complete once its
keys file exists. A run looks every item up by its digest, reads (memory-maps) the rows found, computes only the
missing items and appends them as a new shard. Concurrent runs are safe: shards are immutable, named by their
content, and a duplicate row is harmless.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pmmrec.utils.io import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the meaning of a cached row changes
DIGEST_BYTES = 16  # per-item content digests (blake2b-128), the keys of the cache


def tensors_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of named tensors: their names, dtypes, shapes and values (memory layout and device do not matter:
    a channels-last copy hashes the same)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(named, key=lambda pair: pair[0]):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


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


def fill(job: CacheJob, cache_dir: Path | None, batch_size: int, progress: bool) -> tuple[torch.Tensor, int, int]:
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
