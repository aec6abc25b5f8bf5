"""The benchmarks' synthetic catalogues, and recall@k of an approximate index against exact search.

``pmmrec bench serve`` serves, and ``pmmrec bench recall`` measures, a :class:`~pmmrec.inference.Recommender`
over synthetic item vectors with a randomly initialised SASRec user encoder of the CPU recipe's size
(:func:`synthetic_recommender`). Serving cost depends on the catalogue size, the vector dimension and the user
encoder's shape, not on trained values; an approximate index's recall does depend on the vectors
(:func:`catalogue_vectors`).
"""

from __future__ import annotations

import time

import numpy as np

from pmmrec.errors import PmmrecError

DIM = 64  # model.dim of configs/cpu.yaml, the CPU recipe
MAX_SEQ_LEN = 20  # data.max_seq_len default (paper/ref)
K = 10
CATALOGUES = ("random", "clustered")
CLUSTER_SIZE = 100  # items per cluster of the clustered catalogue
SPECTRUM = 0.65  # clustered: variance of dimension d falls as (d+1)^-0.65
NOISE = 1.5  # clustered: spread of items around their centre, relative to the centres' spread


def catalogue_vectors(num_items: int, kind: str = "random", dim: int = DIM, seed: int = 0):
    """``(N+1, D)`` item vectors of a synthetic catalogue (row 0 the zero padding), or None for ``random``.

    ``random``: the ID embedding table's initialisation (independent N(0, 0.02^2) values), what the benchmark
    always served. ``clustered``: a mixture of ``N / 100`` Gaussian clusters whose variance decays over the
    dimensions, each item its cluster's centre plus noise of 1.5 times the centres' spread, scaled to the ID
    table's 0.02 overall. Its constants were set against two models trained on MovieLens-1M (ID SASRec and
    multimodal, 3,706 items, dim 64), searched with the same small indexes: effective dimension 31 (theirs 32-34,
    random 63); recall@10 of a spherical IVF with 64 lists probing 8 0.86 (theirs 0.69-0.75, random 0.49); of an
    HNSW with M=4 at efSearch 40 0.44 (theirs 0.51-0.52, random 0.49). So it is a little easier than trained
    vectors for IVF and a little harder for HNSW, and random vectors are a little harder for both.
    """
    import torch

    if kind not in CATALOGUES:
        raise PmmrecError(f"catalogue must be one of {', '.join(CATALOGUES)}, got {kind!r}")
    if kind == "random":
        return None
    gen = torch.Generator().manual_seed(seed + 7)
    scale = 0.02 * torch.arange(1, dim + 1, dtype=torch.float32).pow(-SPECTRUM / 2) * (dim ** 0.5) / \
        torch.arange(1, dim + 1, dtype=torch.float32).pow(-SPECTRUM).sum().sqrt()  # (D,) per-dimension spread
    centres = torch.randn(max(1, num_items // CLUSTER_SIZE), dim, generator=gen) * scale  # (C, D)
    members = torch.randint(0, len(centres), (num_items,), generator=gen)  # (N,)
    vectors = torch.zeros(num_items + 1, dim)
    vectors[1:] = centres[members] + NOISE * torch.randn(num_items, dim, generator=gen) * scale
    return vectors


def synthetic_recommender(num_items: int, dim: int = DIM, seed: int = 0, catalogue: str = "random",
                          index: str = "exact", index_settings=None, index_cache=None):
    """A Recommender over ``num_items`` synthetic item vectors (:func:`catalogue_vectors`), with a random SASRec
    user encoder; ``index``, ``index_settings`` and ``index_cache`` as :class:`~pmmrec.inference.Recommender`
    takes them (the same arguments give the same vectors, so a cached index is found again)."""
    import torch

    from pmmrec.config import load_config
    from pmmrec.inference.catalogue import Catalogue
    from pmmrec.inference.recommender import Recommender
    from pmmrec.models.pmmrec import PMMRec

    torch.manual_seed(seed)
    config = load_config(None, ["model.item_tower=id", f"model.dim={dim}", f"data.max_seq_len={MAX_SEQ_LEN}"])
    model = PMMRec(config, num_items).eval()
    ids = [f"i{n}" for n in range(1, num_items + 1)]
    vectors = catalogue_vectors(num_items, catalogue, dim, seed)
    if vectors is None:
        vectors = model.item_encoder.id_embedding.weight.detach().clone()  # (N+1, D), row 0 = padding
    # The user encoder reads history items from the catalogue's vectors, so these are what it sees too.
    return Recommender(model, config, Catalogue(ids, vectors), index=index, index_settings=index_settings,
                       index_cache=index_cache)


def write_synthetic_store(folder, num_items: int, catalogue: str = "random", dim: int = DIM, seed: int = 0) -> None:
    """A vector store of a synthetic catalogue (:func:`catalogue_vectors`; ``random``: N(0, 0.02^2) values, the ID
    table's initialisation) in ``folder``, for ``bench serve --workers N``, whose workers share it."""
    import torch

    from pmmrec.inference.vector_store import DIGEST_BYTES, StoreKey, VectorStore

    vectors = catalogue_vectors(num_items, catalogue, dim, seed)
    if vectors is None:
        gen = torch.Generator().manual_seed(seed)
        vectors = torch.cat([torch.zeros(1, dim), torch.randn(num_items, dim, generator=gen) * 0.02])
    key = StoreKey(weights="synthetic", dim=dim, model={"tower": "synthetic"},
                   inputs={"items": num_items, "catalogue": catalogue, "seed": seed})
    VectorStore(folder).write(key, [f"i{n}" for n in range(1, num_items + 1)],
                              np.zeros((num_items, DIGEST_BYTES), dtype=np.uint8), vectors[1:].numpy())


def shared_synthetic_recommender(folder, seed: int = 0, index: str = "exact", index_settings=None,
                                 index_cache=None):
    """A Recommender over the synthetic store in ``folder`` (:func:`write_synthetic_store`), memory-mapped and
    followed as each worker of ``pmmrec serve --workers N`` does, with a random SASRec user encoder."""
    import torch

    from pmmrec.config import load_config
    from pmmrec.evaluation.ranking import ItemBlocks
    from pmmrec.inference.catalogue import Catalogue
    from pmmrec.inference.recommender import Recommender
    from pmmrec.inference.shared_store import SharedStore
    from pmmrec.inference.vector_store import VectorStore
    from pmmrec.models.pmmrec import PMMRec

    store = VectorStore(folder)
    key = store.key()
    torch.manual_seed(seed)
    config = load_config(None, ["model.item_tower=id", f"model.dim={key.dim}", f"data.max_seq_len={MAX_SEQ_LEN}"])
    model = PMMRec(config, 1).eval()  # the user encoder; the item vectors are the store's (its ID table is unused)
    follower = SharedStore(store, key)
    attached = follower.open()
    if attached is None:
        raise PmmrecError(f"{folder}: the benchmark's vector store cannot be read")
    catalogue = Catalogue(attached.ids, [ItemBlocks.from_array(b) for b in attached.blocks])
    return Recommender(model, config, catalogue, index=index, index_settings=index_settings, shared=follower,
                       index_cache=index_cache)


def histories(num_items: int, queries: int, seed: int = 3) -> list[list[str]]:
    """Random histories of 5 to 50 catalogue ids of a synthetic catalogue (as ``bench serve`` sends them)."""
    rng = np.random.default_rng(seed)
    return [[f"i{n}" for n in rng.integers(1, num_items + 1, size=int(length))]
            for length in rng.integers(5, 51, size=queries)]


def measure_recall(exact, approx, history_lists, k: int = K) -> dict:
    """Recall@k of recommender ``approx`` against ``exact`` (same catalogue and model) over ``history_lists``,
    both through ``recommend_many`` (history excluded), and what could go wrong with it: history items returned,
    answers shorter than k (both must be 0)."""
    from pmmrec.inference.ann import recall_at_k  # torch: imported when measuring, not with the module

    started = time.perf_counter()
    want = exact.recommend_many(history_lists, k)
    exact_s = time.perf_counter() - started
    index = approx.approximate_index
    fallbacks = index.fallbacks if index is not None else 0
    started = time.perf_counter()
    got = approx.recommend_many(history_lists, k)
    approx_s = time.perf_counter() - started
    ids = lambda results: [[r.item_id for r in result.items] for result in results]  # noqa: E731
    per_user = [len(set(a) & set(e)) / len(e) for a, e in zip(ids(got), ids(want), strict=True)]
    return {f"recall@{k}": round(recall_at_k(ids(got), ids(want)), 4),
            "users_below_0.9": int(sum(r < 0.9 for r in per_user)), "worst_user": round(min(per_user), 2),
            "history_items_returned": sum(len(set(a) & set(h)) for a, h in zip(ids(got), history_lists,
                                                                                 strict=True)),
            "short_answers": sum(len(r.items) < k for r in got),
            "exact_fallback_users": (index.fallbacks - fallbacks) if index is not None else 0,
            "queries": len(history_lists), "exact_ms_per_query": round(exact_s * 1000 / len(history_lists), 3),
            "approx_ms_per_query": round(approx_s * 1000 / len(history_lists), 3)}
