"""How a content model's recommender gets its catalogue at start: the quick path and the full one (docs/design.md §8).

The **full** path builds the whole model, reads the domain, computes the store key and each item's content digest,
and brings the vector store in step with the catalogue (:func:`~pmmrec.inference.catalogue_vectors.sync_catalogue`,
which encodes what is new or changed). When it ends with the store holding the catalogue row for row, it records so
in the store's start-up cache, with the identities of every file that decided it
(:meth:`~pmmrec.inference.start_cache.StartCache.record_catalogue`).

The **quick** path is taken when that record still holds: the same checkpoint file, overrides and pmmrec version,
the same ``items.tsv`` and image database, the same store manifest, and the same tokenizer files (the
fingerprint in the key). Then nothing can have changed an item's vector, and the restart reads ``items.tsv`` (ids
and titles) and the store (checked: sizes and SHA-256, key, version, ids in order) and answers with a
:class:`DeferredModel`: the user encoder now, the item encoder (``transformers``, the pretrained weights) the first
time an item is encoded. ``users.tsv`` decides no vector: when it changed, it is validated as the full path does.
Anything else takes the full path; so does a store that fails its checks, which the full path then rebuilds.

**Shared** (``shared=True``: one of ``pmmrec serve --workers N``, :mod:`pmmrec.inference.shared_store`): the store
is opened memory-mapped rather than read into memory, and taken as it is when it holds every domain item under the
key (the other workers may have appended items to it; ``pmmrec serve`` brings it in step before starting them).
When the record holds but for the store's manifest (appends change it), the key comes from the record and the model
is a :class:`DeferredModel`, as on the quick path. Otherwise the whole model is built and the store opened under its
key, or brought in step first (the full path) and opened then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pmmrec.data.batch import ItemInputs
from pmmrec.data.domain import Domain, find_domain_files, read_domain, read_items, read_users
from pmmrec.data.item_features import tokenizer_fingerprint
from pmmrec.errors import PmmrecError
from pmmrec.inference.catalogue_vectors import CatalogueItems, model_key, sync_catalogue
from pmmrec.inference.item_ids import PackedStrings
from pmmrec.inference.shared_store import Attached, SharedStore
from pmmrec.inference.start_cache import StartCache, catalogue_sources, file_identity, open_cache
from pmmrec.inference.vector_store import StoreError, StoreKey, VectorStore
from pmmrec.models.item_encoder import ItemEncoder
from pmmrec.models.loading import Checkpoint, build_model, id_rows
from pmmrec.models.pmmrec import PMMRec
from pmmrec.models.user import build_user_encoder
from pmmrec.pretrained import tokenizer_dir
from pmmrec.utils.timing import PhaseClock

log = logging.getLogger(__name__)

USER_PREFIX = "user_encoder."


class DeferredModel:
    """What :class:`~pmmrec.inference.Recommender` calls of a :class:`~pmmrec.models.pmmrec.PMMRec`, with the
    item encoder built on first use from the checkpoint's tensors, kept in memory (a checkpoint file replaced since
    the start cannot mix in). ``key``: the store key the served vectors were computed under; the item encoder
    built later must have it, or encoding an item is an error (its vectors would not match the catalogue's)."""

    def __init__(self, checkpoint: Checkpoint, key: StoreKey, device: torch.device, cache: StartCache | None = None):
        config = checkpoint.config
        self.config, self.key, self.device, self.cache = config, key, device, cache
        state = checkpoint.state["model"]
        self.user_encoder = build_user_encoder(config.model, config.data.max_seq_len)
        self.user_encoder.load_state_dict({name[len(USER_PREFIX):]: tensor for name, tensor in state.items()
                                           if name.startswith(USER_PREFIX)})
        self.user_encoder.to(device).eval()
        # Only what build_model reads: the optimiser's state and the rest of the checkpoint are let go. The trained
        # ids are packed (item_ids.py) until then: as the checkpoint's list of str they would be a second copy of
        # the catalogue's ids in every serving process (200,000 ids like item000123: a quick shared start holds
        # 17.7 MiB rather than 27.9, tracemalloc).
        self._checkpoint: Checkpoint | None = Checkpoint(
            checkpoint.path, {"model": state, "config": checkpoint.state["config"]}, config, [])
        self._trained_ids: PackedStrings | None = PackedStrings(checkpoint.item_ids)
        self._model: PMMRec | None = None
        self._lock = threading.Lock()

    def eval(self) -> DeferredModel:
        return self

    @property
    def loaded(self) -> bool:
        """Whether the item encoder has been built."""
        return self._model is not None

    def encode_sequences(self, item_embs: Tensor, mask: Tensor) -> Tensor:
        return self.user_encoder(item_embs, mask)  # (B, L, D) -> (B, L, D), as PMMRec.encode_sequences

    @property
    def item_encoder(self) -> ItemEncoder:
        return self.full().item_encoder

    def encode_items(self, items: ItemInputs) -> Tensor:
        return self.full().encode_items(items)  # (N, D)

    def full(self) -> PMMRec:
        """The whole model, built once (thread-safe). Answers keep using this object's user encoder (the same
        weights)."""
        with self._lock:
            if self._model is None:
                started = time.perf_counter()
                ids = self._trained_ids
                loaded = build_model(replace(self._checkpoint, item_ids=ids.strings(0, len(ids))), self.device)
                key = model_key(loaded.model, loaded.config, loaded.item_ids)
                if key != self.key:
                    # E.g. preprocessing code changed under the same pmmrec version: the record that let this start
                    # skip the checks is dropped, so that the next start checks (and re-encodes) every item.
                    if self.cache is not None:
                        self.cache.forget_catalogue()
                    raise PmmrecError(
                        f"{loaded.path}: the item encoder built now does not make the vectors the catalogue is served "
                        f"with ({'; '.join(self.key.differences(key))}); restart the server: the next start checks "
                        "every item again")
                self._model, self._checkpoint, self._trained_ids = loaded.model, None, None
                log.info("item encoder loaded in %.1fs (deferred at start: every item's vector came from the store)",
                         time.perf_counter() - started)
            return self._model


@dataclass
class StartedCatalogue:
    model: PMMRec | DeferredModel
    domain: Domain
    vectors: Tensor | None  # (N+1, D) float32, row 0 = padding; None when the catalogue is ``attached``
    key: StoreKey
    wrote: str  # what happened to the store (SyncResult.wrote); "nothing" on the quick path
    shared: SharedStore | None = None  # shared=True and the store could be shared: this process's view of it
    attached: Attached | None = None  # then the store's items as it read them (vectors memory-mapped)


def start_catalogue(checkpoint: Checkpoint, identity: dict | None, folder: Path, store: VectorStore | None,
                    overrides: Sequence[str], device: torch.device, batch_size: int, progress: bool,
                    clock: PhaseClock, shared: bool = False) -> StartedCatalogue:
    """The model and the catalogue's vectors of a content checkpoint over the domain ``folder``, by the quick path
    when it holds, else the full one (see the module docstring). ``identity``: the checkpoint file's
    (:func:`~pmmrec.inference.start_cache.file_identity`), taken before it was read. ``clock`` times the phases.
    ``shared``: open the store shared with other processes (module docstring); when it cannot be shared, the
    vectors are read as without it (``shared`` and ``attached`` None)."""
    cache = open_cache(store)
    recorded = _recorded(checkpoint, identity, folder, store, cache, overrides, clock, shared) \
        if cache is not None else None
    if recorded is not None:
        key, version, domain = recorded
        if shared:
            opened = _open_shared(store, key, domain)
            if opened is not None:
                model = DeferredModel(checkpoint, key, device, cache)
                clock.lap("model")
                log.info("catalogue vectors: %d shared from the store %s (quick start: the catalogue, the "
                         "checkpoint and the store are as the last start recorded them; the item encoder is loaded "
                         "when an item is first encoded)", len(opened[1].ids), store.path)
                return StartedCatalogue(model, domain, None, key, "nothing", *opened)
        else:
            quick = _quick(checkpoint, store, cache, key, version, domain, device, clock)
            if quick is not None:
                return quick
    loaded = build_model(checkpoint, device)
    model, config, trained_ids = loaded.model, loaded.config, loaded.item_ids
    clock.lap("model")
    began, sources = time.time_ns(), [file_identity(p) for p in catalogue_sources(folder, config)]
    users = file_identity(find_domain_files(folder).users)
    domain = read_domain(folder, empty_title=config.data.empty_title,
                         missing_image=config.data.missing_image if config.model.uses_images else None)
    items = CatalogueItems.from_domain(domain, id_rows(trained_ids, domain.item_ids), config.data.missing_image)
    clock.lap("domain")
    key = model_key(model, config, trained_ids, cache, identity, overrides)
    clock.lap("key")
    if shared and store is not None:
        # A store holding every domain item under this key is taken as it is (the other workers may have added
        # items to it): the start that wrote it checked them (pmmrec serve syncs before starting its workers).
        opened = _open_shared(store, key, domain)
        if opened is not None:
            clock.lap("vectors")
            return StartedCatalogue(model, domain, None, key, "nothing", *opened)
    synced = sync_catalogue(model, config, items, key, store, device, batch_size, progress,
                            info={"checkpoint": str(checkpoint.path), "domain": str(folder)})
    clock.lap("vectors")
    if cache is not None and synced.wrote != "failed" and config.model.item_tower == "content" and \
            [file_identity(p) for p in catalogue_sources(folder, config)] == sources:
        cache.record_catalogue(identity, overrides, sources, users, began, key)
    if shared and store is not None and synced.wrote != "failed":
        opened = _open_shared(store, key, domain)
        if opened is not None:
            return StartedCatalogue(model, domain, None, key, synced.wrote, *opened)
    return StartedCatalogue(model, domain, synced.vectors, key, synced.wrote)


def _open_shared(store: VectorStore, key: StoreKey, domain: Domain) -> tuple[SharedStore, Attached] | None:
    """The store opened shared (:meth:`SharedStore.open`), if it holds every item of ``domain`` under ``key``."""
    follower = SharedStore(store, key)
    attached = follower.open(required=domain.item_ids)
    return (follower, attached) if attached is not None else None


def _recorded(checkpoint: Checkpoint, identity: dict | None, folder: Path, store: VectorStore, cache: StartCache,
              overrides: Sequence[str], clock: PhaseClock, shared: bool) -> tuple[StoreKey, int, Domain] | None:
    """The store key and version of the catalogue record, and the domain read without its images, when the record
    holds (the checkpoint, the catalogue's files, the tokenizer and, unless ``shared``, the store manifest as
    recorded); else None."""
    config = checkpoint.config
    if config.model.item_tower != "content":  # content+id: ID rows depend on the trained ids (full path)
        return None
    recorded = cache.recorded_catalogue(identity, overrides, catalogue_sources(folder, config), manifest=not shared)
    if recorded is None:
        return None
    key, version = recorded.key, recorded.version
    if config.model.modality != "vision" and \
            tokenizer_fingerprint(tokenizer_dir(config.text.encoder)) != key.inputs.get("tokenizer"):
        log.info("vector store %s: the tokenizer's files changed since the last start", store.path)
        return None
    # The start that made the record checked the images (data.missing_image), as they still are.
    files = find_domain_files(folder)
    ids, titles = read_items(files.items, config.data.empty_title)
    began, users = time.time_ns(), file_identity(files.users)
    if users is None or users != recorded.users:  # users.tsv changed: validated as the full path does
        read_users(files.users, {item_id: n for n, item_id in enumerate(ids, start=1)})
        if file_identity(files.users) == users:
            cache.record_users(users, began)
    domain = Domain(folder.resolve().name, ids, titles, [], [], image_db=files.images, path=folder)
    clock.lap("domain")
    return key, version, domain


def _quick(checkpoint: Checkpoint, store: VectorStore, cache: StartCache, key: StoreKey, version: int,
           domain: Domain, device: torch.device, clock: PhaseClock) -> StartedCatalogue | None:
    """The quick path (module docstring) once the record holds: the store read, checked, as the record says."""
    try:
        stored = store.read()
    except StoreError as e:  # the full path reads it again, says why it is unusable, and rebuilds it
        log.info("vector store %s failed its checks (%s): taking the full path", store.path, e)
        return None
    if stored.version != version or stored.key != key or stored.ids != domain.item_ids:
        return None  # written since the record was checked (another process): the full path looks again
    vectors = torch.zeros(len(stored.ids) + 1, key.dim)
    np.copyto(vectors[1:].numpy(), stored.vectors)
    clock.lap("vectors")
    model = DeferredModel(checkpoint, key, device, cache)
    clock.lap("model")
    log.info("catalogue vectors: %d reused, 0 encoded; store %s: nothing (quick start: the catalogue, the "
             "checkpoint and the store are as the last start recorded them; the item encoder is loaded when an "
             "item is first encoded)", len(stored.ids), store.path)
    return StartedCatalogue(model, domain, vectors, key, "nothing")
