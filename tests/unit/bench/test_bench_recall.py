"""`pmmrec bench recall` in quick mode: recall@10 of both indexes against exact search, on both catalogues."""

import json
from types import SimpleNamespace

import pytest

from pmmrec.errors import PmmrecError


def test_bench_recall_quick_measures_each_index_against_exact_search(tmp_path):
    pytest.importorskip("faiss")
    from pmmrec.bench import recall

    out = tmp_path / "recall.json"
    result = recall.run(SimpleNamespace(out=str(out), quick=True, items=2000, catalogue=None, index=None,
                                        sweep=True))
    assert json.loads(out.read_text()) == result
    assert result["items"] == 2000 and result["queries"] == recall.QUICK["queries"]
    for catalogue in ("random", "clustered"):
        for kind in ("hnsw", "ivf"):
            entry = result["catalogues"][catalogue][kind]
            # The approximate path never returns a history item and always returns k items.
            assert entry["history_items_returned"] == 0 and entry["short_answers"] == 0, entry
            # 2,000 items: the default search effort reaches (nearly) every item.
            assert entry["recall@10"] >= 0.97, (catalogue, kind, entry)
        # IVF: probing more lists can only find more of the exact top 10; probing them all finds all of it.
        ivf = [point["recall@10"] for point in result["catalogues"][catalogue]["ivf"]["sweep"]]
        assert ivf == sorted(ivf) and ivf[-1] == 1.0 and ivf[0] < 1.0


def test_bench_recall_refuses_an_index_that_is_not_approximate(tmp_path):
    from pmmrec.bench import recall

    with pytest.raises(PmmrecError, match="--index hnsw or ivf"):
        recall.run(SimpleNamespace(out=str(tmp_path / "r.json"), quick=True, items=None, catalogue=None,
                                   index="exact", sweep=False))
