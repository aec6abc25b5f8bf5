"""A catalogue's item vectors through the vector store: stored vectors reused, only new or changed items encoded.

docs/design.md §8. :func:`sync_catalogue` is the one way a catalogue gets its vectors (``Recommender.from_checkpoint``,
``pmmrec serve``, ``pmmrec export-embeddings``):

1. The model's :class:`~pmmrec.inference.vector_store.StoreKey` (:func:`model_key`): a digest of every tensor of
   its item encoder, trainable ones included, with the preprocessing of titles and images. A store under another
   key (another checkpoint, other encoder files, another ``text.max_tokens``...) is rebuilt, with a log line
   saying what differs.
2. Each item's content digest (:func:`item_digests`): its title bytes and the digest of its image bytes (the
   feature cache's, :func:`pmmrec.data.item_features.image_digest`), for the modalities the model reads.
3. An item whose id and digest are in the store takes the stored vector; the others (new, or changed since) are
   encoded, in batches, through the one ``ItemEncoder`` (docs/design.md, house rule 4). Under torchrun the batches
   are dealt to the ranks in turn and gathered: the same batches one process encodes, so the same vectors.
4. The store is brought in step with the catalogue: untouched when it matched, a segment appended when only
   items at the end are new, rewritten otherwise. A truncated or corrupted store (size or SHA-256 mismatch) is
   rebuilt, never served. A store that cannot be written (a read-only folder) is a warning: the vectors are
   served from memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pmmrec.config import Config
from pmmrec.data.batch import ItemInputs
from pmmrec.data.domain import Domain
from pmmrec.data.item_features import (
    ImageRef,
    ImageTable,
    ItemFeatureStore,
    image_digest,
    tokenizer_fingerprint,
)
from pmmrec.errors import PmmrecError
from pmmrec.inference.start_cache import StartCache, open_cache
from pmmrec.inference.vector_store import DIGEST_BYTES, StoredVectors, StoreError, StoreKey, VectorStore
from pmmrec.models.features import build_feature_store
from pmmrec.models.item_encoder import ItemEncoder
from pmmrec.models.pmmrec import PMMRec
from pmmrec.pretrained import tokenizer_dir
from pmmrec.runtime import distributed
from pmmrec.runtime.feature_files import tensors_fingerprint
from pmmrec.utils.timing import PhaseClock

log = logging.getLogger(__name__)

NewContent = tuple[str, str | None, bytes | None]  # (item id, title, image bytes) of an item added at run time


def default_store_path(checkpoint: str | os.PathLike, domain: str | os.PathLike) -> Path:
    """Where a checkpoint's store for a catalogue lives by default: beside the checkpoint,
    ``<checkpoint without .pt>.vectors/<domain folder name>-<8 hex of its resolved path>``.

    One store per (checkpoint file, catalogue): serving ``best.pt`` and ``last.pt``, or two domains, never makes
    them overwrite each other's, and deleting the run deletes its stores.
    """
    checkpoint, domain = Path(checkpoint), Path(domain)
    tag = hashlib.blake2b(str(domain.resolve()).encode(), digest_size=4).hexdigest()
    return checkpoint.with_name(checkpoint.stem + ".vectors") / f"{domain.resolve().name}-{tag}"


def model_key(model: PMMRec, config: Config, trained_ids: Sequence[str], cache: StartCache | None = None,
              checkpoint: dict | None = None, overrides: Sequence[str] = ()) -> StoreKey:
    """The key of the vectors ``model`` makes: its item encoder's weights, dimension, tower and preprocessing.

    With a start-up ``cache``, the identity of the ``checkpoint`` file the model was loaded from (taken before it
    was read: :func:`~pmmrec.inference.start_cache.file_identity`) and the ``overrides`` it was loaded with, the
    weights digest recorded for that unchanged file is taken instead of hashing every tensor again
    (:mod:`pmmrec.inference.start_cache`)."""
    encoder = model.item_encoder
    inputs: dict = {}
    if encoder.uses_text:
        tokenizer = tokenizer_fingerprint(tokenizer_dir(config.text.encoder))
        inputs.update(text_encoder=config.text.encoder, max_tokens=config.text.max_tokens,
                      lowercase=config.text.lowercase, tokenizer=tokenizer)
    if encoder.uses_vision:
        inputs["image_preprocessing"] = repr(encoder.vision.preprocessor())
    if encoder.tower != "content":  # an item's ID row comes from the ids the model was trained on
        inputs["trained_ids"] = hashlib.blake2b("\n".join(trained_ids).encode("utf-8", "surrogatepass"),
                                                digest_size=16).hexdigest()
    def weights() -> str:
        return tensors_fingerprint(encoder.state_dict().items())

    digest = cache.weights_digest(checkpoint, overrides, weights) if cache is not None and checkpoint is not None \
        else weights()
    return StoreKey(weights=digest, dim=encoder.dim,
                    model={"tower": encoder.tower, "modality": encoder.modality,
                           "fusion": config.model.fusion if encoder.fusion is not None else None},
                    inputs=inputs)


@dataclass
class CatalogueItems:
    """What encoding a catalogue needs: item ids, titles, where images are, and ``content+id`` ID rows."""

    ids: list[str]
    titles: list[str]
    image_refs: list[ImageRef] | None
    id_rows: np.ndarray | None = None  # (N+1,) each item's ID-table row (None: the item numbers themselves)
    missing_image: str = "error"

    @classmethod
    def from_domain(cls, domain: Domain, id_rows: np.ndarray | None, missing_image: str) -> CatalogueItems:
        return cls(list(domain.item_ids), list(domain.titles), domain.image_refs(), id_rows, missing_image)


def _digest(encoder: ItemEncoder, item_id: str, title: str | None, image: bytes | None, row: int) -> bytes:
    """What an item's vector is computed from, for the modalities ``encoder`` reads (blake2b-128)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    if encoder.tower == "id":
        h.update(b"id\0" + item_id.encode("utf-8", "surrogatepass"))
    if encoder.uses_text:
        h.update(b"title\0" + (title or "").encode("utf-8", "surrogatepass") + b"\0")
    if encoder.uses_vision:
        h.update(b"image\0" + image)  # the image's own digest
    if encoder.tower == "content+id":
        h.update(b"row\0" + int(row).to_bytes(8, "little"))
    return h.digest()


def item_digests(encoder: ItemEncoder, items: CatalogueItems, cache: StartCache | None = None) -> np.ndarray:
    """(N, DIGEST_BYTES) uint8 content digest of each catalogue item (reads every image's bytes, decodes none).

    With a start-up ``cache``, the image digests recorded for unchanged image databases are taken instead of
    reading every image again (:mod:`pmmrec.inference.start_cache`)."""
    images = None
    if encoder.uses_vision:
        def compute() -> np.ndarray:
            table = ImageTable(items.image_refs, encoder.vision.preprocessor(), items.missing_image, cache_items=0)
            try:
                return table.content_digests()[0]  # (N+1, DIGEST_BYTES), row 0 = padding
            finally:
                table.close()

        images = cache.image_digests(items.image_refs, items.missing_image, compute) if cache is not None \
            else compute()
    out = np.zeros((len(items.ids), DIGEST_BYTES), dtype=np.uint8)
    for i, item_id in enumerate(items.ids):
        row = int(items.id_rows[i + 1]) if items.id_rows is not None else i + 1
        image = images[i + 1].tobytes() if images is not None else None
        out[i] = np.frombuffer(_digest(encoder, item_id, items.titles[i], image, row), dtype=np.uint8)
    return out


def new_item_digests(encoder: ItemEncoder, items: Sequence[NewContent]) -> np.ndarray:
    """Digests of items added at run time, computed as :func:`item_digests` computes a catalogue item's (no ID
    row: a new item is its content vector alone), so that once persisted they match on the next start."""
    out = np.zeros((len(items), DIGEST_BYTES), dtype=np.uint8)
    for i, (item_id, title, image) in enumerate(items):
        out[i] = np.frombuffer(_digest(encoder, item_id, title, image_digest(image), 0), dtype=np.uint8)
    return out


@torch.no_grad()
def encode_numbers(model: PMMRec, features: ItemFeatureStore | None, numbers: np.ndarray, device: torch.device,
                   batch_size: int = 256, progress: bool = False) -> Tensor:
    """(len(numbers), D) float32 CPU vectors of catalogue items ``numbers`` (1-based), in batches of
    ``batch_size``.

    Under torchrun the batches are dealt to the ranks in turn (rank r encodes batches r, r + W, ...) and gathered
    on every rank: each vector comes from the batch one process would encode it in, hence the same arithmetic.
    The progress bar (rank 0) counts the whole catalogue's items per second (rank 0's pace times the ranks).
    """
    model.eval()
    world, rank = distributed.world_size(), distributed.rank()
    batches = [numbers[i:i + batch_size] for i in range(0, len(numbers), batch_size)]
    bar = tqdm(total=len(numbers), unit=" items", desc="encode items", leave=False,
               disable=(not progress or not distributed.is_main()) or None)
    mine = []
    for batch in batches[rank::world]:
        inputs = features.lookup(batch) if features is not None else ItemInputs(items=torch.from_numpy(batch))
        mine.append(model.encode_items(inputs.to(device)).float())  # (b, D)
        bar.update(min(len(batch) * world, bar.total - bar.n))
    bar.close()
    dim = model.item_encoder.dim
    local = torch.cat(mine) if mine else torch.zeros(0, dim, device=device)
    if world == 1:
        return local.cpu()
    parts = distributed.all_gather_varlen(local)
    taken = [0] * world
    out = []
    for b, batch in enumerate(batches):  # batch b is the (b // W)-th of rank b % W
        r = b % world
        out.append(parts[r][taken[r]:taken[r] + len(batch)])
        taken[r] += len(batch)
    return torch.cat(out).cpu() if out else torch.zeros(0, dim)


@dataclass
class SyncResult:
    vectors: Tensor | None  # (N+1, D) float32, row 0 = padding; None on ranks other than 0
    reused: int
    encoded: int
    wrote: str  # "nothing", "appended", "written" (the whole store), or "failed" (the store could not be written)


@contextlib.contextmanager
def _locked(store: VectorStore) -> Iterator[None]:
    """The store's writer lock when the folder can hold one (a read-only store is still read, unlocked)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(store.lock())
        except OSError as e:
            log.debug("vector store %s: no lock (%s)", store.path, e)
        yield


def _usable(store: VectorStore, key: StoreKey) -> StoredVectors | None:
    """The store's content if it is intact and has ``key``; None (and why, logged) otherwise."""
    if not store.exists():
        log.info("vector store %s: none yet, encoding the catalogue", store.path)
        return None
    try:
        stored = store.read()
    except StoreError as e:
        log.warning("vector store %s is unusable, rebuilding it: %s", store.path, e)
        return None
    differences = stored.key.differences(key)
    if differences:
        log.warning("vector store %s was written for another model or preprocessing, rebuilding it: %s",
                    store.path, "; ".join(differences))
        return None
    return stored


def sync_catalogue(model: PMMRec, config: Config, items: CatalogueItems, key: StoreKey, store: VectorStore | None,
                   device: torch.device, batch_size: int = 256, progress: bool = False,
                   info: dict | None = None) -> SyncResult:
    """The catalogue's vectors, reusing ``store`` (None: encode everything, store nothing); see the module
    docstring. Under torchrun every rank must call it; rank 0 alone reads and writes the store."""
    with _locked(store) if store is not None and distributed.is_main() else contextlib.nullcontext():
        clock = PhaseClock()
        digests = stored = missing = None
        if distributed.is_main():
            digests, stored, missing = _plan(model.item_encoder, items, key, store, clock)
        if distributed.world_size() > 1:  # rank 0's plan: which items to encode (the store stays with rank 0)
            missing = distributed.all_gather_objects(missing)[0]
        encoded = torch.zeros(0, key.dim)
        if len(missing):
            encoded = _encode_missing(model, config, items, missing, device, batch_size, progress)
        clock.lap("encode")
        result = None
        if distributed.is_main():
            result = _assemble(items, key, store, digests, stored, missing, encoded, info)
            clock.lap("assemble and write")
            seconds = clock.total()
            rate = f", {len(missing) / seconds:.0f} items/s" if len(missing) else ""
            log.info("catalogue vectors: %d reused, %d encoded in %.3fs%s; store %s: %s (%s)", result.reused,
                     result.encoded, seconds, rate, store.path if store is not None else "none", result.wrote, clock)
    distributed.barrier()
    return result if result is not None else SyncResult(None, 0, len(missing), "nothing")


def _encode_missing(model: PMMRec, config: Config, items: CatalogueItems, missing: np.ndarray,
                    device: torch.device, batch_size: int, progress: bool) -> Tensor:
    """(len(missing), D) vectors of catalogue items ``missing`` (1-based numbers). The feature store holds those
    items only (one changed title does not tokenise the whole catalogue again); batches hold the same items in the
    same order either way, so the vectors are the same."""
    encoder = model.item_encoder
    if not (encoder.uses_text or encoder.uses_vision):  # the ID tower: the numbers are the table's rows
        return encode_numbers(model, None, missing, device, batch_size, progress)
    picked = missing - 1
    rows = items.id_rows[missing] if items.id_rows is not None else missing
    features = build_feature_store(config, encoder, [items.titles[i] for i in picked],
                                   [items.image_refs[i] for i in picked] if items.image_refs is not None else None,
                                   image_cache_items=0, id_rows=np.concatenate([[0], rows]).astype(np.int64))
    try:
        return encode_numbers(model, features, np.arange(1, len(missing) + 1), device, batch_size, progress)
    finally:
        features.close()  # read-only LMDB handles: persisting items later opens the database for writing


def _plan(encoder: ItemEncoder, items: CatalogueItems, key: StoreKey, store: VectorStore | None, clock: PhaseClock):
    """(digests, the usable stored vectors or None, the item numbers to encode)."""
    digests = item_digests(encoder, items, open_cache(store))
    clock.lap("digests")
    stored = _usable(store, key) if store is not None else None
    clock.lap("store read")
    if stored is None or not stored.ids:
        return digests, stored, np.arange(1, len(items.ids) + 1, dtype=np.int64)
    if stored.ids == items.ids:  # the usual restart: row for row
        same = (stored.digests == digests).all(axis=1)
    else:
        row = {item_id: r for r, item_id in enumerate(stored.ids)}
        rows = np.array([row.get(item_id, -1) for item_id in items.ids], dtype=np.int64)
        same = (rows >= 0) & (stored.digests[np.maximum(rows, 0)] == digests).all(axis=1)
    return digests, stored, np.flatnonzero(~same).astype(np.int64) + 1


def _assemble(items: CatalogueItems, key: StoreKey, store: VectorStore | None, digests: np.ndarray,
              stored: StoredVectors | None, missing: np.ndarray, encoded: Tensor, info: dict | None) -> SyncResult:
    n = len(items.ids)
    vectors = torch.zeros(n + 1, key.dim)
    if stored is not None and len(missing) == 0 and stored.ids == items.ids:
        np.copyto(vectors[1:].numpy(), stored.vectors)  # the usual restart: one copy of the map, in order
        return SyncResult(vectors, n, 0, "nothing")
    if stored is not None:
        row = {item_id: r for r, item_id in enumerate(stored.ids)}
        fresh = set(missing.tolist())
        numbers = [k for k in range(1, n + 1) if k not in fresh]
        rows = [row[items.ids[k - 1]] for k in numbers]
        if numbers:
            order = np.argsort(rows)  # read the memory map in file order
            vectors[np.asarray(numbers)[order]] = torch.from_numpy(stored.vectors[np.asarray(rows)[order]])
    if len(missing):
        vectors[torch.from_numpy(missing)] = encoded
    reused = n - len(missing)
    if store is None:
        return SyncResult(vectors, reused, len(missing), "nothing")
    base = len(stored.ids) if stored is not None else -1
    tail_only = (stored is not None and stored.ids == items.ids[:base]
                 and np.array_equal(missing, np.arange(base + 1, n + 1)))
    try:
        if tail_only:
            store.append(key, items.ids[base:], digests[base:], vectors[base + 1:].numpy())
            return SyncResult(vectors, reused, len(missing), "appended")
        store.write(key, items.ids, digests, vectors[1:].numpy(), info)
        return SyncResult(vectors, reused, len(missing), "written")
    except (OSError, StoreError) as e:
        log.warning("could not write the vector store %s (%s): serving the vectors from memory; the next start "
                    "encodes again (give another folder with --store)", store.path, e)
        return SyncResult(vectors, reused, len(missing), "failed")


class CatalogueStore:
    """The store a Recommender keeps in step with its catalogue: the items it adds are appended to it.

    ``additions="always"`` for a store that caches a domain's catalogue (an item added without persisting is
    dropped from the store at the next start, when the domain does not list it; persisted, it is reused);
    ``"persisted"`` for a store that *is* the catalogue (``--embeddings``), where only persisted items go in.
    """

    def __init__(self, store: VectorStore, key: StoreKey, additions: str = "always"):
        if additions not in ("always", "persisted"):
            raise ValueError(f"additions must be 'always' or 'persisted', got {additions!r}")
        self.store, self.key, self.additions = store, key, additions

    def append(self, encoder: ItemEncoder, items: Sequence[NewContent], vectors: Tensor) -> int:
        """Append new items with their (N, D) vectors; returns the store's new version."""
        with self.store.lock():
            return self.store.append(self.key, [i[0] for i in items], new_item_digests(encoder, items),
                                     vectors.float().cpu().numpy())


def load_exported(store: VectorStore, key: StoreKey, checkpoint: str | os.PathLike) -> StoredVectors:
    """An exported store to serve as is (``--embeddings``): verified, and made by this checkpoint's item encoder.

    A dimension or weights digest that differs from the checkpoint's is an error naming both; other
    preprocessing (new items would be encoded differently from the stored ones) is a warning.
    """
    try:
        stored = store.read()
    except StoreError as e:
        raise StoreError(f"--embeddings {store.path}: {e}; export it again with `pmmrec export-embeddings`") \
            from None
    if stored.key.dim != key.dim:
        raise PmmrecError(f"--embeddings {store.path} holds vectors of dimension {stored.key.dim}, but the checkpoint "
                          f"{checkpoint} makes vectors of dimension {key.dim}: export the catalogue with this "
                          "checkpoint")
    if stored.key.weights != key.weights:
        raise PmmrecError(f"--embeddings {store.path} was made by item-encoder weights {stored.key.weights}, but the "
                          f"checkpoint {checkpoint} has weights {key.weights}: export the catalogue with this "
                          "checkpoint")
    other = [d for d in stored.key.differences(key) if not d.startswith(("vector dimension", "item-encoder"))]
    if other:
        log.warning("--embeddings %s: the store was encoded with other settings (%s); items added now are encoded "
                    "with the checkpoint's", store.path, "; ".join(other))
    return stored
