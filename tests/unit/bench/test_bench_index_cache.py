"""The benchmarks' synthetic catalogues find a cached approximate index again (``bench serve --work DIR``)."""

from __future__ import annotations

import pytest

from pmmrec.bench.catalogue import histories, synthetic_recommender
from pmmrec.inference.ann import IndexSettings


def test_a_synthetic_catalogue_reads_its_index_back_from_the_cache(tmp_path):
    pytest.importorskip("faiss")
    settings = IndexSettings(hnsw_m=8, hnsw_ef_construction=20, hnsw_ef_search=32)
    first = synthetic_recommender(2000, index="hnsw", index_settings=settings, index_cache=tmp_path)
    assert not first.approximate_index.cached and len(list(tmp_path.glob("hnsw-*.faiss"))) == 1
    again = synthetic_recommender(2000, index="hnsw", index_settings=settings, index_cache=tmp_path)
    assert again.approximate_index.cached and "efSearch=32" in again.approximate_index.describe
    queries = histories(2000, 20)
    assert [[r.item_id for r in res.items] for res in again.recommend_many(queries, k=10)] == \
        [[r.item_id for r in res.items] for res in first.recommend_many(queries, k=10)]
    # another catalogue (other vectors) does not take that index
    other = synthetic_recommender(2000, seed=1, index="hnsw", index_settings=settings, index_cache=tmp_path)
    assert not other.approximate_index.cached
