"""Approximate top-K for large catalogues: faiss HNSW or IVF candidates, re-ranked exactly (docs/design.md §8).

Exact recommending scores every catalogue item for every user: ``O(N D)`` a request, which grows with the
catalogue until a request costs more than a latency target allows. An approximate index finds a user's best
items by inner product without scanning them all. The recommender uses it only to *find candidates*:

1. **candidates**: the index's ``C = k + H + margin`` best items by ``user . item`` (faiss, inner product), where
   ``H`` is the number of items to exclude (the history, under ``exclude_history``), so that ``k`` are left once
   they are removed. Items added to the catalogue after the index was built (``Recommender.add_items``,
   ``POST /items``) are not in the index: every one of them is a candidate of every user, so they are **searched
   exactly beside the index** (an index is never written while other threads search it);
2. **exact re-ranking**: every candidate is scored ``user . item`` in float32 from the catalogue's own vectors
   (the scores the exact path gives, up to float32 rounding), the excluded items are removed exactly as the exact
   path removes them (:func:`~pmmrec.evaluation.ranking.topk_items`), and the best ``k`` are kept;
3. **k honoured**: a user left with fewer than ``min(k, items not excluded)`` candidates (an IVF whose probed lists
   hold too few items, a graph search that found too few) is answered by the exact path.

So an approximate answer lists only catalogue items not excluded, in exact score order, with exact scores; what it
can lose is a true top-K item the index did not return among its ``C`` candidates. :func:`recall_at_k` measures
that (``pmmrec bench recall``). With ``index="auto"`` (the default) a catalogue of at most
:data:`AUTO_EXACT_MAX_ITEMS` items is scored exactly and a larger one through :data:`AUTO_KIND`.

Building a graph over a million items takes minutes, so a built index is kept in a cache folder (the vector
store's ``index/``) under a key of everything it was built from: the items' vectors (SHA-256 of their bytes), the
kind and its build settings, the seed and the faiss version. The next start with the same catalogue reads it back
**memory-mapped** (``IO_FLAG_MMAP_IFC``: the vectors it holds, the bulk of it, are pages of the file that every
process serving it shares) instead of building it; a catalogue that changed gets a new key, so a stale index is
never used. The search settings (``efSearch``, ``nprobe``) are not part of the key: they are set after reading.
A cache folder that cannot be written (an exported store on a read-only volume) is still read; an index not found
there is cached in the user's own folder instead (:func:`user_cache_dir`), so it is built once, not at every start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from pmmrec.errors import PmmrecError
from pmmrec.evaluation.ranking import ItemBlocks, history_in_chunk, pad_histories, topk_items

log = logging.getLogger(__name__)

IndexKind = Literal["auto", "exact", "hnsw", "ivf"]
INDEX_KINDS: tuple[str, ...] = ("auto", "exact", "hnsw", "ivf")
# Where exact scoring stops being the cheaper search (README "Large catalogues"; `pmmrec bench serve --items N
# --index exact|hnsw`, 2 cores, 50 clients, random vectors, 2026-12-05): HNSW at its default settings (M=64,
# efSearch 512, recall@10 0.998-1.0) costs about as much CPU a request whatever the catalogue (server CPU for 5,000
# requests 11-21 s from 100,000 to 1,000,000 items) while exact scoring grows linearly (5.0 s at 100,000, 21.3 s at
# 1,000,000); p99 exact / HNSW: 59 / 103 ms at 100,000, 72 / 152 at 200,000, 102 / 165 at 400,000, 175 / 153 at
# 1,000,000. The crossover is near 900,000 items on a CPU with bfloat16 products (exact search shortlists in
# bfloat16 there), and by that cost model near 600,000 on one without (float32 scoring ~1.7x dearer); 500,000 is below
# both. (Past about 100,000 items neither search holds a 50 ms p99 with 50 clients on 2 cores.)
AUTO_EXACT_MAX_ITEMS = 500_000
# What `auto` uses above the threshold. bench recall, recall@10 (random / clustered vectors): HNSW at its defaults
# 1.000 / 0.976 at 100,000 items and 1.000 / 0.991 at 300,000; IVF at 100,000 items 0.51 / 0.66 at nprobe 64, and
# still 0.83 / 0.90 at nprobe 256 (README).
AUTO_KIND = "hnsw"
# Bump when the way an index is built changes (anything the cache key below does not already hold).
INDEX_FORMAT = 1
INDEX_CACHE = "index"  # the cache folder's name inside a vector store
INDEX_CACHE_KEEP = 3  # index files kept in a cache folder, newest first (others are deleted after a write)
CACHE_ENV = "PMMREC_CACHE_DIR"  # pmmrec's own cache folder (default $XDG_CACHE_HOME/pmmrec, else ~/.cache/pmmrec)


def user_cache_dir() -> Path:
    """pmmrec's own cache folder: ``$PMMREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/pmmrec``, else ``~/.cache/pmmrec``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "pmmrec"


def can_write(folder: Path) -> bool:
    """Whether files can be created in ``folder``, or, where it does not exist yet, in its nearest existing parent
    (where it would be made): write and search permission, on a file system mounted writable."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)
    return False


@dataclass(frozen=True)
class IndexSettings:
    """How the approximate index is built and searched. Defaults tuned with ``pmmrec bench recall`` (README)."""

    exact_max_items: int = AUTO_EXACT_MAX_ITEMS  # `auto`: exact at or below this many items, approximate above
    margin: int = 32  # candidates fetched beyond k + the items to exclude
    # Graph neighbours per node (faiss IndexHNSWFlat M); the bottom layer holds 2 M int32 an item (512 bytes at 64,
    # twice a dim-64 vector). bench recall on clustered items at efSearch 512: 0.935 with 32 and 0.991 with 64 at
    # 300,000 items (efSearch 2048 took 32 only to ~0.976: the graph, not the search, limited it), though 0.993 and
    # 0.976 at 100,000. Random items: 0.993 and 1.000 at 300,000.
    hnsw_m: int = 64
    # Candidate list while building (faiss default 40). A better graph, at twice the build time of 200: on 100,000
    # clustered items recall@10 at efSearch 512 (M=32) was 0.959 with 200 and 0.993 with 400.
    hnsw_ef_construction: int = 400
    hnsw_ef_search: int = 512  # candidate list while searching; faiss uses max(efSearch, candidates fetched)
    ivf_nlist: int | None = None  # IVF inverted lists; None: 4 * sqrt(N), the usual rule of thumb
    ivf_nprobe: int = 64  # lists visited per query

    def __post_init__(self):
        for name in ("exact_max_items", "margin", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                     "ivf_nprobe"):
            value = getattr(self, name)
            least = 0 if name == "margin" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise PmmrecError(f"index setting {name} must be an integer >= {least}, got {value!r}")
        if self.ivf_nlist is not None and (not isinstance(self.ivf_nlist, int) or self.ivf_nlist < 1):
            raise PmmrecError(f"index setting ivf_nlist must be a positive integer or None, got {self.ivf_nlist!r}")

    def nlist(self, count: int) -> int:
        """IVF lists for ``count`` items: the setting, or 4 * sqrt(count) but at least 39 items a list (what faiss's
        k-means asks for); never more lists than items."""
        wanted = self.ivf_nlist if self.ivf_nlist is not None else min(round(4 * math.sqrt(count)), count // 39)
        return max(1, min(wanted, count))


def import_faiss(kind: str):
    """The faiss module, or a :class:`PmmrecError` naming the package to install."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs each CPU variant it tries
    try:
        import faiss
    except ImportError:
        raise PmmrecError(f"index {kind!r} needs the package faiss-cpu: pip install faiss-cpu "
                          "(or pip install 'pmmrec[ann]')") from None
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss("auto")
    except PmmrecError:
        return False
    return True


def check_index(kind: str) -> None:
    """Fail early on an unknown kind, or on ``hnsw``/``ivf`` without faiss (before a catalogue is encoded)."""
    if kind not in INDEX_KINDS:
        raise PmmrecError(f"index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind in ("hnsw", "ivf"):
        import_faiss(kind)


def resolve_index(kind: str, count: int, settings: IndexSettings) -> str:
    """``exact``, ``hnsw`` or ``ivf`` for a catalogue of ``count`` items; ``auto`` decides by size.

    ``auto`` above the threshold without faiss installed serves exactly, with a warning naming the package (a
    slower answer rather than none); asking for ``hnsw`` or ``ivf`` without faiss is an error.
    """
    check_index(kind)
    if kind != "auto":
        return kind
    if count <= settings.exact_max_items:
        return "exact"
    if not faiss_available():
        log.warning("index auto: %d items is above the exact threshold (%d) but faiss is not installed, so every "
                    "request scores the whole catalogue; pip install faiss-cpu for approximate search", count,
                    settings.exact_max_items)
        return "exact"
    return AUTO_KIND


class ApproximateIndex:
    """A faiss inner-product index over items ``1..count`` of a catalogue, and the re-ranked top-K over it."""

    def __init__(self, vectors: Tensor | ItemBlocks, kind: str, settings: IndexSettings | None = None, seed: int = 0,
                 cache: str | os.PathLike | None = None):
        """``vectors``: ``(N+1, D)``, row 0 the padding, or a catalogue snapshot's :class:`ItemBlocks`. Items
        appended to the catalogue later keep their numbers past ``N`` and are searched exactly (:meth:`topk`).
        The index holds its own copy of the vectors (faiss's storage), besides its graph or lists.

        ``cache``: a folder where an index built over the same vectors with the same build settings is read back
        from (memory-mapped) instead of being built, and where a newly built one is written (atomically; a folder
        that cannot be written only logs a warning)."""
        if kind not in ("hnsw", "ivf"):
            raise PmmrecError(f"approximate index kind must be hnsw or ivf, got {kind!r}")
        if isinstance(vectors, Tensor) and (vectors.dim() != 2 or vectors.shape[0] < 2):
            raise ValueError(f"vectors must be (N+1, D) with row 0 the padding, got {tuple(vectors.shape)}")
        blocks = ItemBlocks.of(vectors.detach() if isinstance(vectors, Tensor) else vectors)
        if blocks.count < 1:
            raise ValueError("an index needs at least one item")
        faiss = import_faiss(kind)
        self.kind, self.settings, self.seed = kind, settings or IndexSettings(), seed
        self.count, self.dim = blocks.count, blocks.dim
        # (N, D): index row i = item i+1. One float32 block (a memory map) is passed as it is, not copied.
        items = np.ascontiguousarray(blocks.rows(1, self.count + 1).float().cpu().numpy())
        started = time.perf_counter()
        self.cache_path = _cache_file(Path(cache), f"{kind}-{self._key(items, faiss)}.faiss") \
            if cache is not None else None
        index = self._read_cached(faiss)
        self.cached = index is not None  # read back from the cache, not built here
        if index is None:
            index = self._build(items, faiss)
            self._write_cache(index, faiss)
        self.index = index
        self.set_search(ef_search=self.settings.hnsw_ef_search, nprobe=self.settings.ivf_nprobe)
        self.users = 0  # users answered
        self.fallbacks = 0  # of them, answered by the exact path (too few candidates left)
        self.build_s = time.perf_counter() - started
        log.info("recommender: %s index over %d items %s in %.1f s", self.describe, self.count,
                 f"read from {self.cache_path}" if self.cached else "built", self.build_s)

    def _key(self, items: np.ndarray, faiss) -> str:
        """What the built index depends on: the vectors' bytes, the kind, its build settings, seed, faiss."""
        s = self.settings
        build = {"format": INDEX_FORMAT, "faiss": faiss.__version__, "kind": self.kind, "count": self.count,
                 "dim": self.dim, "seed": self.seed}
        build.update({"m": s.hnsw_m, "ef_construction": s.hnsw_ef_construction} if self.kind == "hnsw"
                     else {"nlist": s.nlist(self.count)})
        digest = hashlib.sha256(json.dumps(build, sort_keys=True).encode())
        digest.update(memoryview(items).cast("B"))
        return digest.hexdigest()[:32]

    def _build(self, items: np.ndarray, faiss):
        s = self.settings
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = s.hnsw_ef_construction
        else:
            nlist = s.nlist(self.count)
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            # k-means on a sample: 64 items a list is plenty for the centroids (faiss wants >= 39), and training
            # on all of a million items would cost more than adding them.
            sample = min(self.count, 64 * nlist)
            rows = np.random.default_rng(self.seed).choice(self.count, sample, replace=False) \
                if sample < self.count else np.arange(self.count)
            index.cp.seed = self.seed
            # Spherical k-means (unit centroids): with inner-product assignment, unnormalised centroids of large
            # norm take most items and a probe scans a few huge lists (measured on 20,000 random items: the
            # largest list 16x the mean without, 1.4x with); recall at a given nprobe is higher with it too.
            index.cp.spherical = True
            index.train(items[np.sort(rows)])
            index.own_fields = True  # the index frees its quantizer (as one read back from a file does)
            quantizer.this.disown()
        index.add(items)
        return index

    def _read_cached(self, faiss):
        """The cached index, memory-mapped; None when there is none, or it cannot be read (then rebuilt)."""
        path = self.cache_path
        if path is None or not path.is_file():
            return None
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as e:
            log.warning("index cache %s cannot be read (%s); building the index again", path,
                        str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__)
            return None
        if index.ntotal != self.count or index.d != self.dim:
            log.warning("index cache %s holds %d items of dim %d, not %d of dim %d; building the index again", path,
                        index.ntotal, index.d, self.count, self.dim)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # newest first when the cache folder is pruned
        return index

    def _write_cache(self, index, faiss) -> None:
        """Write the index to the cache (a temporary file renamed into place) and keep the newest few there."""
        path = self.cache_path
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            faiss.write_index(index, str(tmp))
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            log.warning("could not write the index cache %s (%s); the next start builds the index again", path, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        kept = sorted(path.parent.glob("*.faiss"), key=lambda p: p.stat().st_mtime, reverse=True)
        crashed = [p for p in path.parent.glob(".*.tmp") if time.time() - p.stat().st_mtime > 3600]
        for old in kept[INDEX_CACHE_KEEP:] + crashed:
            with contextlib.suppress(OSError):
                old.unlink()  # a process that has it mapped keeps its pages until it unmaps them

    def set_search(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change how hard the index searches (HNSW ``efSearch``, IVF ``nprobe``) without rebuilding it: for
        tuning (``pmmrec bench recall --sweep``); not while other threads search."""
        s = self.settings
        if self.kind == "hnsw":
            if ef_search is not None:
                self.index.hnsw.efSearch = ef_search
            self.describe = (f"HNSW (M={s.hnsw_m}, efConstruction={s.hnsw_ef_construction}, "
                             f"efSearch={self.index.hnsw.efSearch})")
        else:
            if nprobe is not None:
                self.index.nprobe = min(nprobe, self.index.nlist)
            self.describe = f"IVF (nlist={self.index.nlist}, nprobe={self.index.nprobe})"

    def candidates(self, users: Tensor, fetch: int) -> Tensor:
        """``(U, fetch)`` item numbers of the index's best items for each user by inner product; 0 where the
        index found fewer."""
        faiss = import_faiss(self.kind)
        # One thread per search, as many as torch's: the service scores batches side by side, one per core.
        faiss.omp_set_num_threads(torch.get_num_threads())
        _, labels = self.index.search(np.ascontiguousarray(users.detach().float().cpu().numpy()), fetch)
        return torch.from_numpy(labels) + 1  # faiss's -1 (none found) becomes 0, the padding

    def topk(self, users: Tensor, vectors: Tensor | ItemBlocks, k: int,
             exclude: Sequence[Tensor] | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(scores, items)``, both ``(U, k)``, as :func:`~pmmrec.evaluation.ranking.topk_items` returns them
        over ``vectors`` (a snapshot of the catalogue this index was built on: ``(M+1, D)`` or its
        :class:`ItemBlocks`, ``M >= N``)."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        vectors = ItemBlocks.of(vectors.float() if isinstance(vectors, Tensor) else vectors)
        if vectors.count < self.count:
            raise ValueError(f"the catalogue has {vectors.count} items, fewer than the index's {self.count}")
        users = users.detach().float().cpu()
        num_users, total = users.shape[0], vectors.count
        excl = pad_histories(exclude if exclude is not None else [[] for _ in range(num_users)], num_users)
        excluded = _distinct(excl)  # (U,) items each user excludes
        fetch = k + (int(excluded.max()) if num_users else 0) + self.settings.margin
        self.users += num_users
        if num_users == 0 or fetch >= self.count:  # the index would return (nearly) everything: scan it all
            return topk_items(users, vectors, k, excl)
        cand = self.candidates(users, fetch)  # (U, C) item numbers, 0 = none
        scores = torch.bmm(vectors.gather(cand), users.unsqueeze(2)).squeeze(2)  # (U, C) exact float32 scores
        drop = cand == 0
        if excl.shape[1]:
            drop |= (cand.unsqueeze(2) == excl.unsqueeze(1)).any(2)  # (U, C, H) -> (U, C)
        scores = scores.masked_fill(drop, float("-inf"))
        if total > self.count:  # items added since the index was built: scored exactly for every user
            tail = users @ vectors.rows(self.count + 1, total + 1).float().t()  # (U, T)
            inside, cols = history_in_chunk(excl, self.count + 1, total + 1)  # (U, H)
            rows = torch.arange(num_users).unsqueeze(1).expand_as(cols)
            tail[rows[inside], cols[inside]] = float("-inf")
            numbers = torch.arange(self.count + 1, total + 1).expand(num_users, total - self.count)
            scores, cand = torch.cat([scores, tail], dim=1), torch.cat([cand, numbers], dim=1)  # (U, C + T)
        width = min(k, scores.shape[1])
        best, pick = scores.topk(width, dim=1)  # (U, width)
        items = torch.where(best == float("-inf"), 0, cand.gather(1, pick))
        if width < k:
            best = torch.cat([best, best.new_full((num_users, k - width), float("-inf"))], dim=1)
            items = torch.cat([items, items.new_zeros(num_users, k - width)], dim=1)
        # Users the candidates could not give min(k, items not excluded) to: the exact path answers them.
        short = (items > 0).sum(1) < torch.clamp(total - excluded, max=k)
        if bool(short.any()):
            redo = short.nonzero().squeeze(1)
            self.fallbacks += len(redo)
            best[redo], items[redo] = topk_items(users[redo], vectors, k, excl[redo])
        return best, items


def _cache_file(folder: Path, name: str) -> Path:
    """Where index file ``name`` of cache ``folder`` is read and written: in ``folder`` when it holds the file or
    can be written; else in a folder of its own under :func:`user_cache_dir` (one for each cache folder, so that
    pruning one never deletes another's index)."""
    if (folder / name).is_file() or can_write(folder):
        return folder / name
    own = user_cache_dir() / INDEX_CACHE / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    log.info("index cache %s cannot be written; the index is cached in %s instead", folder, own)
    return own / name


def _distinct(excl: Tensor) -> Tensor:
    """``(U,)`` distinct item numbers > 0 in each row of a 0-padded ``(U, H)`` tensor."""
    if excl.shape[1] == 0:
        return torch.zeros(excl.shape[0], dtype=torch.long)
    s = excl.sort(dim=1).values
    valid = s > 0
    first = torch.ones_like(valid)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    return (valid & first).sum(1)


def recall_at_k(approx: Sequence[Sequence[str]], exact: Sequence[Sequence[str]]) -> float:
    """Mean over users of |approximate top-k ∩ exact top-k| / |exact top-k| (users with an empty exact list skipped)."""
    ratios = [len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact, strict=True) if e]
    return float(np.mean(ratios)) if ratios else 1.0
