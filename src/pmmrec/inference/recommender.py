"""Recommender: top-K next items for a history of raw item ids, and new items added without retraining.

docs/design.md §8. A content model (``model.item_tower: content``) knows items only by their title and image, so
an item that did not exist at training time is recommendable as soon as it has one of them: it is encoded by
the same :class:`~pmmrec.models.item_encoder.ItemEncoder` the catalogue was encoded with (the one item path,
docs/design.md, house rule 4) and appended to the catalogue. The ID tower (SASRec baseline) cannot do this, by construction.

Example::

    rec = Recommender.from_checkpoint("runs/tiny/checkpoints/best.pt")
    rec.add_items([NewItem("new1", title="Sea wave ship", image="new1.png")])
    rec.recommend(["ta3", "ta17", "ta5"], k=10)   # [Recommendation(item_id=..., score=...), ...]
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from pmmrec.config import Config
from pmmrec.data.batch import ItemInputs
from pmmrec.data.datasets import left_pad
from pmmrec.data.domain import Domain, find_domain_files, read_domain
from pmmrec.data.image_db import MAX_KEY_BYTES, image_keys
from pmmrec.data.images import open_image
from pmmrec.data.item_features import TokenTable
from pmmrec.errors import DataError, PmmrecError
from pmmrec.evaluation.evaluator import encode_catalogue
from pmmrec.evaluation.ranking import ItemBlocks, topk_items
from pmmrec.inference.ann import (
    INDEX_CACHE,
    ApproximateIndex,
    IndexKind,
    IndexSettings,
    check_index,
    resolve_index,
)
from pmmrec.inference.catalogue import Catalogue, DuplicateItemsError, ItemInfo, Snapshot
from pmmrec.inference.catalogue_vectors import (
    CatalogueStore,
    default_store_path,
    load_exported,
    model_key,
    new_item_digests,
)
from pmmrec.inference.persist import persist_items
from pmmrec.inference.scoring import ShortlistScorer, bf16_pays
from pmmrec.inference.shared_store import POLL_INTERVAL, Attached, SharedStore, StoreDiverged
from pmmrec.inference.start import DeferredModel, start_catalogue
from pmmrec.inference.start_cache import file_identity
from pmmrec.inference.vector_store import StoreError, VectorStore
from pmmrec.models.loading import LoadedModel, build_model, read_checkpoint
from pmmrec.models.pmmrec import PMMRec
from pmmrec.pretrained import tokenizer_dir
from pmmrec.utils.timing import PhaseClock

log = logging.getLogger(__name__)
SHORTLIST_MIN_ITEMS = 20_000  # smaller catalogues are scored in float32 directly: a few ms either way

UnknownItems = Literal["skip", "reject"]


class UnknownItemsError(PmmrecError):
    """A history names items that are not in the catalogue (under ``unknown_items="reject"``)."""

    def __init__(self, unknown: list[str]):
        self.unknown = unknown
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        super().__init__(f"unknown item id(s) in the history: {', '.join(map(repr, unknown[:5]))}{more}")


class CannotAddItemsError(PmmrecError):
    """The model cannot embed new items (the ID tower)."""


class UnknownItemWarning(UserWarning):
    """Items of a history were skipped because the catalogue does not have them."""


@dataclass
class NewItem:
    """An item to add: a raw id plus a title and/or an image (encoded bytes, or the path of an image file)."""

    item_id: str
    title: str | None = None
    image: bytes | str | os.PathLike | None = None


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    score: float


@dataclass
class RecommendResult:
    """Recommendations for one history, and the history's ids that were skipped as unknown."""

    items: list[Recommendation]
    unknown: list[str] = field(default_factory=list)
    used: int = 0  # how many history items the user vector was built from (the last max_seq_len known ones)


class Recommender:
    """A trained model plus an item catalogue; thread-safe (many recommending threads, items added at any time)."""

    def __init__(self, model: PMMRec | DeferredModel, config: Config, catalogue: Catalogue, *,
                 domain: Path | None = None, device: torch.device | str = "cpu", unknown_items: UnknownItems = "skip",
                 shortlist: bool | None = None, store: CatalogueStore | None = None, index: IndexKind = "auto",
                 index_settings: IndexSettings | None = None, shared: SharedStore | None = None,
                 index_cache: str | os.PathLike | None = None):
        """``model``: a :class:`~pmmrec.models.pmmrec.PMMRec`, or the :class:`~pmmrec.inference.start.DeferredModel`
        of a quick start (the user encoder now, the item encoder when an item is first encoded).
        ``shortlist``: score large catalogues with a certified bfloat16 first pass
        (:mod:`pmmrec.inference.scoring`; same answers); default: on a CPU where it is measured faster.
        ``store``: the vector store that :meth:`add_items` appends new items to (see :meth:`from_checkpoint`).
        ``shared``: the store is shared with other processes (:mod:`pmmrec.inference.shared_store`; the catalogue
        was read from it): items are added through it, and :meth:`refresh` picks up the others' additions.

        ``index``: ``exact`` scores every item; ``hnsw`` or ``ivf`` finds candidates with a faiss index (built
        here, or read back from the vector store's ``index/`` cache when it was built over the same vectors before)
        and re-ranks them exactly (:mod:`pmmrec.inference.ann`); ``auto`` (default) is exact up to
        ``index_settings.exact_max_items`` items (:data:`~pmmrec.inference.ann.AUTO_EXACT_MAX_ITEMS`) and
        approximate above. The choice is made once, on the catalogue as given; items added later are searched
        exactly beside the index. ``index_cache``: the folder the index is cached in (default: the vector store's
        ``index/``; none without a store).
        """
        if unknown_items not in ("skip", "reject"):
            raise PmmrecError(f"unknown_items must be 'skip' or 'reject', got {unknown_items!r}")
        self.index_settings = index_settings if index_settings is not None else IndexSettings()
        self.index = resolve_index(index, len(catalogue), self.index_settings)  # exact, hnsw or ivf
        self.model = model.eval()
        self.config = config
        self.catalogue = catalogue
        self.domain = domain  # the folder that add_items(persist=True) writes to
        self.device = torch.device(device)
        self.unknown_items = unknown_items
        self.max_seq_len = config.data.max_seq_len
        # From the config, not the item encoder, which a quick start builds only when an item is first encoded.
        tower, modality = config.model.item_tower, config.model.modality
        self.can_add_items = tower != "id"  # content+id: a new item is its content vector alone
        self._tokenizer = tokenizer_dir(config.text.encoder) if tower != "id" and modality != "vision" else None
        self._preprocessor = None  # the item encoder's image preprocessing, once an item is first encoded
        self._add_lock = threading.Lock()  # one add_items at a time (encoding, id checks, persisting)
        self._shared = shared
        self._sync_lock = threading.Lock()  # the shared store's view and the catalogue change together
        self._follower: tuple[threading.Thread, threading.Event] | None = None
        self.shortlist = shortlist
        self._scorer: tuple[ItemBlocks, ShortlistScorer] | None = None  # (a snapshot's items, their scorer)
        self.store = store
        # Built on the catalogue as it is now; its rows never change (the catalogue is append-only), so it serves
        # every later snapshot, whose added items it searches exactly.
        # Kept in the vector store's folder (index/), read back at the next start over the same vectors.
        cache = index_cache if index_cache is not None else store.store.path / INDEX_CACHE if store is not None \
            else None
        self._ann = None if self.index == "exact" else ApproximateIndex(catalogue.snapshot().items, self.index,
                                                                        self.index_settings, cache=cache)

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, domain: str | os.PathLike | None = None, *,
                        device: torch.device | str = "cpu", unknown_items: UnknownItems = "skip",
                        batch_size: int = 256, progress: bool = False,
                        overrides: Sequence[str] = (), store: str | os.PathLike | None = "auto",
                        embeddings: str | os.PathLike | None = None, index: IndexKind = "auto",
                        index_settings: IndexSettings | None = None, shared: bool = False) -> Recommender:
        """Rebuild the model of a checkpoint and give it the catalogue of ``domain`` (default: its data.domain).

        A content model can recommend over any domain's items (transfer without fine-tuning); an ID model only
        over the items it was trained on, which the checkpoint lists itself (``domain`` then only adds titles).
        ``overrides`` change the checkpoint's stored config as on the command line, e.g.
        ``["data.missing_image=blank"]`` for a vision model on a catalogue where some items have no image.

        A content model's item vectors come from a vector store (docs/design.md §8): ``store="auto"`` keeps it
        beside the checkpoint (:func:`~pmmrec.inference.catalogue_vectors.default_store_path`), a folder puts it
        there, None encodes the whole catalogue and stores nothing. Only items that are new or changed since the
        store was written are encoded; a store of another model or damaged is rebuilt. When nothing changed since
        the last start (the checkpoint file, the domain's files, the store), the start reads the store and builds
        the item encoder only when an item is first encoded (:mod:`pmmrec.inference.start`). ``embeddings`` serves the
        store in that folder (``pmmrec export-embeddings``) as the catalogue, as is; it must come from this
        checkpoint's item encoder. Titles and images (for display) then come from ``domain`` when there is one.
        ``index`` and ``index_settings``: exact or approximate search, as in the constructor.

        ``shared``: this process is one of several serving the store (``pmmrec serve --workers N``;
        :mod:`pmmrec.inference.shared_store`). The catalogue is then the store's items, memory-mapped, titles and
        images from the domain (items added at run time: from the store); a store that holds every domain item is
        taken as it is, without checking contents again (other processes may have added items to it that the
        domain does not list; ``pmmrec serve`` brings the store in step once, before starting its workers,
        :func:`sync_store`), any other is brought in step first. Items are then added through the store, and
        :meth:`refresh` (or :meth:`follow`) picks up the ones other processes add. A store that cannot be written
        is not shared: a warning, and :attr:`shared_store` is None. As on a quick start, when the start-up record
        holds (its store manifest aside: the other processes' appends change it), the item encoder is built only
        when an item is first encoded (:mod:`pmmrec.inference.start`).
        """
        if isinstance(overrides, str):
            raise PmmrecError(f"overrides must be a list of key=value strings, e.g. [{overrides!r}]")
        check_index(index)  # before the catalogue is encoded
        device = torch.device(device)
        clock = PhaseClock()  # the phases of a start, logged once it is ready (pmmrec bench start reads them)
        identity = file_identity(path)  # before reading: a file replaced meanwhile must not pass for this one
        checkpoint = read_checkpoint(path, list(overrides))
        clock.lap("checkpoint")
        config, trained_ids = checkpoint.config, checkpoint.item_ids
        folder = Path(domain) if domain is not None else (Path(config.data.domain) if config.data.domain else None)
        if embeddings is not None:
            if domain is None and folder is not None and not folder.is_dir():
                folder = None  # the checkpoint's training domain is not on this machine: no titles, no images
            return cls._from_embeddings(build_model(checkpoint, device), Path(embeddings), folder, device,
                                        unknown_items, index, index_settings, shared)
        id_tower = config.model.item_tower == "id"
        if folder is None and not id_tower:
            raise PmmrecError(f"{path}: the checkpoint names no data.domain; give the catalogue's domain folder "
                              "(--domain FOLDER)")
        if id_tower:
            # An ID model's vectors are rows of its table: nothing to encode, nothing to store.
            model = build_model(checkpoint, device).model
            titles = _titles_by_id(folder, trained_ids) if folder is not None else None
            vectors = encode_catalogue(model, None, len(trained_ids), device, batch_size, progress)
            return cls(model, config, Catalogue(trained_ids, vectors.cpu(), titles), domain=folder, device=device,
                       unknown_items=unknown_items, index=index, index_settings=index_settings)
        vector_store = None if store is None else VectorStore(default_store_path(path, folder) if store == "auto"
                                                              else store)
        # The model and the vectors: read back from the store alone when nothing changed since the last start;
        # shared, the store's memory maps.
        started = start_catalogue(checkpoint, identity, folder, vector_store, overrides, device, batch_size,
                                  progress, clock, shared=shared and vector_store is not None)
        model, catalogue_domain, key = started.model, started.domain, started.key
        if started.attached is not None:
            catalogue = _catalogue_from_store(started.attached, catalogue_domain)
            log.info("recommender: %d items from the shared vector store %s (version %d), titles and images "
                     "from %s, model %s/%s, dim %d", len(catalogue), vector_store.path, started.attached.version,
                     folder, config.model.modality, config.model.fusion, catalogue.dim)
            tracker = CatalogueStore(vector_store, key)
        else:
            if shared and vector_store is not None:
                log.warning("the vector store %s cannot be shared: this process serves its own copy of the "
                            "catalogue and does not see items other processes add", vector_store.path)
            refs = catalogue_domain.image_refs()
            present = image_keys(catalogue_domain.image_db) if catalogue_domain.image_db is not None else set()
            catalogue = Catalogue(catalogue_domain.item_ids, started.vectors, catalogue_domain.titles, refs, present)
            log.info("recommender: %d items from %s, model %s/%s, dim %d", len(catalogue), folder,
                     config.model.modality, config.model.fusion, catalogue.dim)
            tracker = CatalogueStore(vector_store, key) if vector_store is not None and started.wrote != "failed" \
                else None
        clock.lap("catalogue")
        recommender = cls(model, config, catalogue, domain=folder, device=device, unknown_items=unknown_items,
                          store=tracker, index=index, index_settings=index_settings, shared=started.shared)
        clock.lap("index")
        log.info("recommender: ready in %.3fs (%s)", clock.total(), clock)
        return recommender

    @classmethod
    def _from_embeddings(cls, loaded: LoadedModel, embeddings: Path, folder: Path | None, device: torch.device,
                         unknown_items: UnknownItems, index: IndexKind = "auto",
                         index_settings: IndexSettings | None = None, shared: bool = False) -> Recommender:
        """The catalogue of an exported store, checked against the checkpoint (see :meth:`from_checkpoint`)."""
        key = model_key(loaded.model, loaded.config, loaded.item_ids)
        vector_store = VectorStore(embeddings)
        stored = load_exported(vector_store, key, loaded.path)
        shown = read_domain(folder, empty_title="blank") if folder is not None else None  # for display only
        follower = None
        if shared:
            follower = SharedStore(vector_store, stored.key)  # the store's key: items are appended under it
            attached = follower.open()
            if attached is None:
                raise StoreError(f"--embeddings {embeddings}: the store changed or broke while it was read; start "
                                 "again")
        else:
            content = {}  # titles and images of items persisted into the store at run time
            for segment in stored.segments:
                content.update(vector_store.read_content(segment))
            attached = Attached(stored.ids, [stored.vectors], content, stored.version)
        catalogue = _catalogue_from_store(attached, shown)
        log.info("recommender: %d items from the vector store %s (version %d), dim %d%s", len(catalogue), embeddings,
                 attached.version, key.dim, f", titles and images from {folder}" if folder is not None else "")
        return cls(loaded.model, loaded.config, catalogue, domain=folder, device=device,
                   unknown_items=unknown_items, store=CatalogueStore(vector_store, key, additions="persisted"),
                   index=index, index_settings=index_settings, shared=follower)

    # ------------------------------------------------------------------------------------------ shared store
    @property
    def shared_store(self) -> SharedStore | None:
        """The vector store this recommender shares with other processes (``shared=True``), or None."""
        return self._shared

    def refresh(self) -> int:
        """Pick up the items other processes added to the shared store since the last look; returns how many
        (always 0 for a recommender that shares no store). Raises :class:`StoreDiverged` when the store was
        rewritten rather than appended to (the catalogue stays as it is)."""
        if self._shared is None:
            return 0
        with self._sync_lock:
            return self._catch_up(force=False)

    def _catch_up(self, force: bool) -> int:
        """(Holding ``_sync_lock``.) Append the shared store's new rows to the catalogue."""
        rows = self._shared.new_rows(self.catalogue.snapshot().ids, force)
        if rows is None:
            return 0
        content = [rows.content.get(iid, (None, None)) for iid in rows.ids]
        self.catalogue.append(rows.ids, torch.from_numpy(rows.vectors), [c[0] for c in content],
                              [c[1] for c in content])
        log.info("picked up %d item(s) added by another process (store version %d): %s", len(rows.ids),
                 rows.version, ", ".join(rows.ids[:5]))
        return len(rows.ids)

    def follow(self, interval: float = POLL_INTERVAL) -> None:
        """Call :meth:`refresh` every ``interval`` seconds in a daemon thread, until :meth:`close` (nothing for a
        recommender that shares no store). A look costs one ``stat`` of ``store.json`` unless it changed."""
        if self._shared is None or self._follower is not None:
            return
        stop = threading.Event()

        def loop() -> None:
            failures = 0
            while not stop.wait(interval):
                try:
                    self.refresh()
                    failures = 0
                except StoreDiverged as e:
                    log.warning("%s; no longer following it (restart to serve the new store)", e)
                    return
                except (OSError, StoreError) as e:  # e.g. segments merged away between the manifest and their files
                    failures += 1
                    (log.warning if failures % 40 == 0 else log.debug)(
                        "could not read the shared vector store %s (%d tries): %s", self._shared.store.path,
                        failures, e)
                except Exception:  # a bug: say so, keep serving what there is
                    log.exception("following the shared vector store %s failed", self._shared.store.path)
                    return

        thread = threading.Thread(target=loop, name="pmmrec-store-follower", daemon=True)
        self._follower = (thread, stop)
        thread.start()

    def close(self) -> None:
        """Stop following the shared store (:meth:`follow`)."""
        follower, self._follower = self._follower, None
        if follower is not None:
            follower[1].set()
            follower[0].join(10)

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def approximate_index(self) -> ApproximateIndex | None:
        """The faiss index candidates come from (``index`` hnsw or ivf), or None when scoring exactly."""
        return self._ann

    def __len__(self) -> int:
        return len(self.catalogue)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.catalogue

    def item(self, item_id: str) -> ItemInfo | None:
        return self.catalogue.info(item_id)

    def item_image(self, item_id: str) -> bytes | None:
        """The encoded image of an item (for display), or None."""
        return self.catalogue.image(item_id)

    def item_vectors(self) -> tuple[list[str], np.ndarray]:
        """Every item's id and vector, ``(ids, (N, D) float32)``, in catalogue order."""
        snap = self.catalogue.snapshot()
        return snap.ids[:], snap.items.rows(1, snap.count + 1).numpy().astype(np.float32, copy=True)

    def _numbers(self, snap: Snapshot, history: Sequence[str], unknown_items: UnknownItems) -> tuple[
            np.ndarray, list[str]]:
        if isinstance(history, str):
            raise PmmrecError("history must be a list of item ids, not one string (split it first)")
        history = list(history)
        found = iter(snap.numbers([i for i in history if isinstance(i, str)]).tolist())  # one look-up for all
        numbers, unknown = [], []
        for item_id in history:
            number = next(found) if isinstance(item_id, str) else 0
            if number:
                numbers.append(number)
            else:
                unknown.append(item_id if isinstance(item_id, str) else repr(item_id))
        if unknown and unknown_items == "reject":
            raise UnknownItemsError(unknown)
        if not numbers:
            raise PmmrecError("no item of the history is in the catalogue" if history else "the history is empty")
        return np.asarray(numbers, dtype=np.int64), unknown

    @torch.no_grad()
    def _user_vectors(self, snap: Snapshot, histories: list[np.ndarray]) -> Tensor:
        """(U, D) user vectors: the user encoder's state after the last max_seq_len items (as in evaluation)."""
        numbers = torch.from_numpy(np.stack([left_pad(h, self.max_seq_len) for h in histories]))  # (U, L)
        inputs = numbers.to(self.device)
        states = self.model.encode_sequences(snap.items.gather(numbers).to(self.device), inputs != 0)  # (U, L, D)
        return states[:, -1].float()

    def encode_user(self, history: Sequence[str], unknown_items: UnknownItems | None = None) -> Tensor:
        """(D,) vector of a history of raw item ids."""
        snap = self.catalogue.snapshot()
        numbers, unknown = self._numbers(snap, history, unknown_items or self.unknown_items)
        self._warn(unknown)
        return self._user_vectors(snap, [numbers])[0].cpu()

    def recommend(self, history: Sequence[str], k: int = 10, exclude_history: bool = True,
                  unknown_items: UnknownItems | None = None) -> list[Recommendation]:
        """The ``k`` best next items for ``history`` (raw ids, oldest first), best first.

        Unknown ids are skipped with an :class:`UnknownItemWarning`, or raise :class:`UnknownItemsError` under
        ``unknown_items="reject"``. With ``exclude_history`` the history's own items are never recommended.
        """
        result = self.recommend_many([history], k, exclude_history, unknown_items)[0]
        self._warn(result.unknown)
        return result.items

    def recommend_many(self, histories: Sequence[Sequence[str]], k: int = 10, exclude_history: bool = True,
                       unknown_items: UnknownItems | None = None) -> list[RecommendResult]:
        """:meth:`recommend` for several histories at once (one matrix product; unknown ids reported, not warned)."""
        results = self.recommend_batch([(h, k, exclude_history, unknown_items) for h in histories])
        for result in results:
            if isinstance(result, PmmrecError):
                raise result
        return results

    def recommend_batch(self, requests: Sequence[tuple[Sequence[str], int, bool, UnknownItems | None]]) -> list[
            RecommendResult | PmmrecError]:
        """Independent requests ``(history, k, exclude_history, unknown_items)`` answered with one matrix product.

        Each answer is a :class:`RecommendResult`, or the :class:`PmmrecError` that request alone caused (the
        others are still answered). The service batches concurrent requests through this.
        """
        snap = self.catalogue.snapshot()  # one consistent catalogue for the whole batch
        out: list[RecommendResult | PmmrecError | None] = [None] * len(requests)
        parsed = []
        for i, (history, k, exclude, unknown_items) in enumerate(requests):
            try:
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise PmmrecError(f"k must be a positive integer, got {k!r}")
                numbers, unknown = self._numbers(snap, history, unknown_items or self.unknown_items)
                parsed.append((i, numbers, unknown, k, exclude))
            except PmmrecError as e:
                out[i] = e
        if parsed:
            users = self._user_vectors(snap, [p[1] for p in parsed])  # (U, D)
            width = min(max(p[3] for p in parsed), snap.count)
            exclude = [torch.from_numpy(p[1]) if p[4] else torch.zeros(0, dtype=torch.long) for p in parsed]
            scorer = self._shortlist_scorer(snap) if self._ann is None else None
            if self._ann is not None:
                scores, items = self._ann.topk(users, snap.items, width, exclude)  # (U, width)
            elif scorer is not None:
                scores, items = scorer.topk(users, width, exclude)  # (U, width)
            else:
                scores, items = topk_items(users, snap.items, width, exclude)
            scores, items = scores.cpu().tolist(), items.cpu().tolist()
            for row, (i, numbers, unknown, k, _) in enumerate(parsed):
                # Slots past the candidates left (fewer than k) hold item 0: padding, dropped.
                recs = [Recommendation(snap.item_id(n), s) for n, s in zip(items[row][:k], scores[row][:k],
                                                                           strict=True) if n > 0]
                out[i] = RecommendResult(recs, unknown, min(len(numbers), self.max_seq_len))
        return out

    def _shortlist_scorer(self, snap: Snapshot) -> ShortlistScorer | None:
        """The bfloat16-shortlist scorer of ``snap``'s vectors, when it is worth using (built once per snapshot)."""
        if snap.count < SHORTLIST_MIN_ITEMS or self.device.type != "cpu":
            return None
        if self.shortlist is None:
            self.shortlist = bf16_pays(snap.items.dim)
        if not self.shortlist:
            return None
        cached = self._scorer
        if cached is not None and not cached[1].pays:  # the certificate keeps failing: float32 from now on
            log.info("recommender: the bfloat16 shortlist needed the float32 path for %d of %d users; scoring in "
                     "float32 from now on", cached[1].fallbacks, cached[1].users)
            self.shortlist, self._scorer = False, None
            return None
        if cached is not None and cached[0] is snap.items:
            return cached[1]
        scorer = ShortlistScorer(snap.items)
        self._scorer = (snap.items, scorer)  # one assignment: concurrent readers see old or new
        return scorer

    @staticmethod
    def _warn(unknown: list[str]) -> None:
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            warnings.warn(f"skipped {len(unknown)} unknown item id(s) in the history: "
                          f"{', '.join(map(repr, unknown[:5]))}{more}", UnknownItemWarning, stacklevel=3)

    # ----------------------------------------------------------------------------------------- new items
    def _check_new(self, items: Sequence[NewItem]) -> list[tuple[str, str | None, bytes | None]]:
        """Validate new items and read their images: ``(item_id, title, image bytes)`` each."""
        if not self.can_add_items:
            raise CannotAddItemsError("this checkpoint's items are ID embeddings (model.item_tower=id): it cannot embed an "
                              "item it was not trained on; use a content model (text, vision or multimodal)")
        encoder = self.model.item_encoder
        out, seen = [], set()
        for item in items:
            iid = item.item_id
            if not isinstance(iid, str) or not iid or iid != iid.strip() or any(c.isspace() for c in iid):
                raise PmmrecError(f"item id {iid!r}: must be a non-empty string without whitespace "
                                  "(users.tsv separates ids by spaces)")
            if len(iid.encode("utf-8")) > MAX_KEY_BYTES:
                raise PmmrecError(f"item id {iid[:40]!r}...: longer than {MAX_KEY_BYTES} bytes")
            if iid in seen:
                raise PmmrecError(f"item id {iid!r} is given twice")
            seen.add(iid)
            title = item.title.strip() if isinstance(item.title, str) else item.title
            if title is not None and not isinstance(title, str):
                raise PmmrecError(f"item {iid!r}: title must be a string")
            image = item.image
            if isinstance(image, (str, os.PathLike)):
                try:
                    image = Path(image).read_bytes()
                except OSError as e:
                    raise PmmrecError(f"item {iid!r}: cannot read image {item.image}: {e.strerror or e}") from None
            elif image is not None:
                image = bytes(image)
            if encoder.uses_text and not encoder.uses_vision and not title:
                raise PmmrecError(f"item {iid!r}: this model reads titles only (model.modality=text): give a title")
            if encoder.uses_vision and not encoder.uses_text and image is None:
                raise PmmrecError(f"item {iid!r}: this model reads images only (model.modality=vision): "
                                  "give an image")
            if not title and image is None:
                raise PmmrecError(f"item {iid!r}: give a title, an image, or both")
            if image is not None and encoder.uses_vision:
                try:
                    open_image(image)  # header check: format and size, before any decoding
                except DataError as e:
                    raise PmmrecError(f"item {iid!r}: {e}") from None
            out.append((iid, title or None, image))
        taken = self.catalogue.existing([iid for iid, _, _ in out])
        if taken:
            raise DuplicateItemsError(f"item id(s) already in the catalogue: {', '.join(map(repr, taken[:5]))}")
        return out

    def _inputs(self, titles: list[str], images: list[bytes | None]) -> ItemInputs:
        """Model inputs of new items, prepared exactly as the catalogue's (ItemFeatureStore) are."""
        n = len(titles)
        # The content item encoder never reads item numbers; 0 (padding) marks these as outside the catalogue.
        inputs = ItemInputs(items=torch.zeros(n, dtype=torch.long))
        if self._tokenizer is not None:
            cfg = self.config.text
            table = TokenTable.build(titles, self._tokenizer, cfg.max_tokens, cfg.lowercase)
            inputs.text_ids, inputs.text_mask = table.lookup(np.arange(1, n + 1))
        encoder = self.model.item_encoder
        if encoder.uses_vision:
            if self._preprocessor is None:
                self._preprocessor = encoder.vision.preprocessor()
            pixels = []
            for iid_image in images:
                if iid_image is None:
                    pixels.append(np.asarray(self._preprocessor.blank(), dtype=np.float32))
                else:
                    # The catalogue serves pixels from their float16 rounding (ImageTable): so do new items.
                    pixels.append(self._preprocessor(iid_image).astype(np.float16).astype(np.float32))
            inputs.images = torch.from_numpy(np.stack(pixels))
            inputs.has_image = torch.tensor([i is not None for i in images], dtype=torch.bool)
        return inputs

    @torch.no_grad()
    def encode_items(self, items: Sequence[NewItem], batch_size: int = 64) -> Tensor:
        """(N, D) vectors of items given by title and/or image, through the model's ItemEncoder (not added)."""
        checked = self._check_new(items)
        return self._encode(checked, batch_size)

    @torch.no_grad()
    def _encode(self, checked: list[tuple[str, str | None, bytes | None]], batch_size: int = 64) -> Tensor:
        chunks = []
        for start in range(0, len(checked), batch_size):
            part = checked[start:start + batch_size]
            try:
                inputs = self._inputs([t or "" for _, t, _ in part], [img for _, _, img in part])
            except DataError as e:
                raise PmmrecError(f"a new item's image cannot be used: {e}") from None
            chunks.append(self.model.encode_items(inputs.to(self.device)).float().cpu())
        return torch.cat(chunks) if chunks else torch.zeros(0, self.catalogue.dim)

    def add_items(self, items: Sequence[NewItem], persist: bool = False) -> list[str]:
        """Encode new items and add them to the catalogue; they are recommendable when this returns.

        ``persist`` also writes them into the catalogue's domain folder (image LMDB, then items.tsv, each
        atomically), so the next :meth:`from_checkpoint` has them. Their vectors go into the recommender's vector
        store (a store serving as the catalogue, ``embeddings=``, takes persisted items only), so that the next
        start encodes nothing. Returns the ids added.

        With a shared store (``shared=True``) the ids are checked against the store under its lock, so an id that
        another process added first is a :class:`DuplicateItemsError` too, and the items (vectors, titles,
        images) are committed to the store, where the other processes find them.
        """
        items = list(items)
        if not items:
            return []
        with self._add_lock:
            checked = self._check_new(items)
            shared = self._shared
            if shared is not None and self.store.additions == "persisted" and not persist:
                raise CannotAddItemsError(
                    f"the vector store {shared.store.path} is served as the catalogue by several processes and takes "
                    "persisted items only: add items with persist=True (pmmrec serve --persist-items)")
            if persist:
                self._check_persistable(checked)
            vectors = self._encode(checked)
            if shared is not None:
                self._add_shared(checked, vectors, persist)
            else:
                if persist and self.domain is not None:
                    persist_items(self.domain, [(iid, title or "", image) for iid, title, image in checked])
                self._store_added(checked, vectors, persist)  # after the domain: a failed domain write leaves it
                self.catalogue.append([c[0] for c in checked], vectors, [c[1] for c in checked],
                                      [c[2] for c in checked])
        log.info("added %d item(s): %s", len(checked), ", ".join(c[0] for c in checked[:5]))
        return [c[0] for c in checked]

    def _add_shared(self, checked: list[tuple[str, str | None, bytes | None]], vectors: Tensor,
                    persist: bool) -> None:
        """Commit encoded items to the shared store, holding its lock: catch up with what the other processes
        added, refuse ids taken meanwhile, write the domain folder (``persist``), append, then show them here."""
        shared = self._shared
        ids = [c[0] for c in checked]
        try:
            with shared.locked(), self._sync_lock:
                self._catch_up(force=True)
                taken = self.catalogue.existing(ids)
                if taken:
                    raise DuplicateItemsError(f"item id(s) already in the catalogue: "
                                              f"{', '.join(map(repr, taken[:5]))}")
                if persist and self.domain is not None:  # under the lock: one writer of items.tsv at a time
                    persist_items(self.domain, [(iid, title or "", image) for iid, title, image in checked])
                shared.append(ids, new_item_digests(self.model.item_encoder, checked), vectors.float().cpu().numpy(),
                              [(title, image) for _, title, image in checked])
                self.catalogue.append(ids, vectors, [c[1] for c in checked], [c[2] for c in checked])
        except StoreDiverged as e:
            raise PmmrecError(f"cannot add items: {e}") from None
        except OSError as e:
            raise PmmrecError(f"cannot add the new item(s) to the shared vector store {shared.store.path}: "
                              f"{e.strerror or e}") from None

    def _store_added(self, checked: list[tuple[str, str | None, bytes | None]], vectors: Tensor,
                     persist: bool) -> None:
        """Append added items to the vector store. A store that caches the domain's catalogue is only a cache:
        if it cannot be written, the recommender goes on without it. A store that is the catalogue
        (``embeddings=``) is where persisted items are kept: failing to write it fails the call."""
        store = self.store
        if store is None or (store.additions == "persisted" and not persist):
            return
        try:
            store.append(self.model.item_encoder, checked, vectors)
        except (OSError, PmmrecError) as e:
            if store.additions == "persisted":
                raise PmmrecError(f"cannot persist the new item(s) to the vector store {store.store.path}: {e}") \
                    from None
            log.warning("could not append the new item(s) to the vector store %s (%s); the next start encodes "
                        "them again", store.store.path, e)
            self.store = None

    def _check_persistable(self, checked: list[tuple[str, str | None, bytes | None]]) -> None:
        if self.domain is None:
            if self.store is not None and self.store.additions == "persisted":
                return  # kept in the vector store the catalogue is served from
            raise PmmrecError("persist=True needs the catalogue's domain folder, and this recommender has none")
        find_domain_files(self.domain)
        if self.config.data.empty_title == "error":
            untitled = [iid for iid, title, _ in checked if not title]
            if untitled:
                raise PmmrecError(f"item {untitled[0]!r}: items.tsv needs a title (data.empty_title=error), so "
                                  "an item without one cannot be persisted")


def _titles_by_id(folder: Path, ids: list[str]) -> list[str | None]:
    from pmmrec.data.domain import read_items

    item_ids, titles = read_items(find_domain_files(folder).items, empty_title="blank")
    by_id = dict(zip(item_ids, titles, strict=True))
    return [by_id.get(i) for i in ids]


def _catalogue_from_store(attached: Attached, shown: Domain | None) -> Catalogue:
    """A catalogue of a store's items in its order, vectors as its blocks (not copied): titles and images from the
    domain ``shown`` when it lists the item, else from the store (items added at run time)."""
    number = shown.item_index() if shown is not None else {}
    refs = shown.image_refs() if shown is not None else []
    present = image_keys(shown.image_db) if shown is not None and shown.image_db is not None else set()
    titles, image_refs, added, images = [], [], [], {}
    for iid in attached.ids:
        k = number.get(iid)
        if k is not None:
            titles.append(shown.titles[k - 1])
            image_refs.append(refs[k - 1])
            added.append(False)
        else:
            title, image = attached.content.get(iid, (None, None))
            titles.append(title)
            image_refs.append(None)
            added.append(iid in attached.content)
            if image is not None:
                images[iid] = image
    blocks = [ItemBlocks.from_array(b) for b in attached.blocks]
    return Catalogue(attached.ids, blocks, titles, image_refs, present, images=images, added=added)


def sync_store(path: str | os.PathLike, domain: str | os.PathLike | None = None, *,
               store: str | os.PathLike | None = "auto", device: torch.device | str = "cpu", batch_size: int = 256,
               progress: bool = False, overrides: Sequence[str] = ()) -> Path | None:
    """Bring a checkpoint's vector store in step with its catalogue, as :meth:`Recommender.from_checkpoint`
    does, without making a recommender: ``pmmrec serve --workers N`` runs it once, before its workers share
    the store (a quick start when nothing changed since the last one: the store is only read and checked).
    Returns the store's folder; None when nothing is stored (the ID tower, ``store=None``) or the store could not
    be written."""
    device = torch.device(device)
    identity = file_identity(path)  # before reading, as from_checkpoint
    checkpoint = read_checkpoint(path, list(overrides))
    config = checkpoint.config
    folder = Path(domain) if domain is not None else (Path(config.data.domain) if config.data.domain else None)
    if config.model.item_tower == "id" or store is None:
        return None
    if folder is None:
        raise PmmrecError(f"{path}: the checkpoint names no data.domain; give the catalogue's domain folder "
                          "(--domain FOLDER)")
    vector_store = VectorStore(default_store_path(path, folder) if store == "auto" else store)
    # As a start does: nothing more than reading the store when nothing changed since the last one.
    started = start_catalogue(checkpoint, identity, folder, vector_store, overrides, device, batch_size, progress,
                              PhaseClock())
    return None if started.wrote == "failed" else vector_store.path
