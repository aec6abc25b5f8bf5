"""Approximate top-K (faiss HNSW / IVF candidates, re-ranked exactly): the exact answer where the index is
exhaustive, the history excluded, k honoured, items added later found, `auto` choosing by size, clear errors."""

import logging
import sys
from pathlib import Path

import pytest
import torch

from pmmrec import NewItem, Recommender
from pmmrec.bench.catalogue import synthetic_recommender
from pmmrec.errors import PmmrecError
from pmmrec.evaluation.ranking import topk_items
from pmmrec.inference.ann import (
    AUTO_EXACT_MAX_ITEMS,
    AUTO_KIND,
    ApproximateIndex,
    IndexSettings,
    faiss_available,
    recall_at_k,
    resolve_index,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="needs faiss-cpu")

ITEMS, DIM = 1500, 16
# Settings under which each index visits every item: its answers must then be the exact ones.
EXHAUSTIVE = {"hnsw": IndexSettings(hnsw_ef_search=ITEMS), "ivf": IndexSettings(ivf_nlist=16, ivf_nprobe=16)}


@pytest.fixture(scope="module")
def exact() -> Recommender:
    return synthetic_recommender(ITEMS, dim=DIM, index="exact")


def beside(rec: Recommender, index: str, settings: IndexSettings | None = None) -> Recommender:
    """A recommender over the same model and catalogue object, searching with ``index``."""
    return Recommender(rec.model, rec.config, rec.catalogue, index=index, index_settings=settings)


def requests(num: int, seed: int = 0, longest: int = 40, ks=(1, 10, 50)):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        length = int(torch.randint(1, longest + 1, (1,), generator=gen))
        history = [f"i{int(n)}" for n in torch.randint(1, ITEMS + 1, (length,), generator=gen)]
        out.append((history, ks[i % len(ks)], i % 5 != 4, None))  # every fifth includes its history
    return out


def answers(results) -> list[list[str]]:
    return [[r.item_id for r in result.items] for result in results]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@needs_faiss
def test_an_exhaustive_index_gives_the_exact_answers(exact, kind):
    approx = beside(exact, kind, EXHAUSTIVE[kind])
    batch = requests(60)
    want, got = exact.recommend_batch(batch), approx.recommend_batch(batch)
    assert answers(got) == answers(want)
    for a, b in zip(got, want, strict=True):  # exact re-ranking: the exact path's scores, to float32 rounding
        torch.testing.assert_close([r.score for r in a.items], [r.score for r in b.items], rtol=1e-5, atol=1e-5)
    index = approx.approximate_index
    assert index is not None and index.users == 60 and index.fallbacks == 0  # the index answered, not a scan


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@needs_faiss
def test_the_history_is_excluded_by_over_fetching(exact, kind):
    """Each history is its user's own 300 best items: every one of the index's first 300 candidates is excluded,
    so k are left only because the index is asked for k + 300 + margin. Without the history in that count every
    user would need the exact fallback (fallbacks would count them)."""
    settings = IndexSettings(hnsw_ef_search=64, ivf_nlist=16, ivf_nprobe=8)
    index = ApproximateIndex(exact.catalogue.snapshot().vectors, kind, settings)
    vectors = exact.catalogue.snapshot().vectors
    users = torch.randn(20, DIM, generator=torch.Generator().manual_seed(1))
    own_best = topk_items(users, vectors, 300)[1]  # (U, 300)
    k = 20
    scores, items = index.topk(users, vectors, k, list(own_best))
    assert index.fallbacks == 0
    assert (items > 0).all() and items.shape == (20, k)  # k honoured
    for row, hist in zip(items.tolist(), own_best.tolist(), strict=True):
        assert not set(row) & set(hist)  # history excluded
    # exact scores, best first
    torch.testing.assert_close(scores, torch.einsum("ukd,ud->uk", vectors[items], users), rtol=1e-5, atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


@needs_faiss
def test_k_is_honoured_through_the_recommender_with_long_histories(exact):
    approx = beside(exact, "hnsw", IndexSettings(hnsw_ef_search=32, margin=0))
    history = [f"i{n}" for n in range(1, 301)]  # longer than max_seq_len: all 300 are excluded, not just 20
    for k in (1, 10, 100):
        got = approx.recommend(history, k=k)
        assert len(got) == k and not set(history) & {r.item_id for r in got}
    assert len(approx.recommend(history, k=ITEMS)) == ITEMS - 300  # every item left, as the exact path gives
    assert answers(approx.recommend_many([history], k=ITEMS)) == answers(exact.recommend_many([history], k=ITEMS))


@needs_faiss
def test_users_the_index_leaves_short_are_answered_exactly(exact):
    """IVF with 64 lists and 1 probed: about 23 items reachable, fewer than k = 200. Those users get the exact
    answer (the fallback), never fewer than k items."""
    approx = beside(exact, "ivf", IndexSettings(ivf_nlist=64, ivf_nprobe=1))
    batch = [(h, 200, True, None) for h, _, _, _ in requests(10, seed=2)]
    got, want = approx.recommend_batch(batch), exact.recommend_batch(batch)
    assert all(len(r.items) == 200 for r in got)
    assert answers(got) == answers(want)
    assert approx.approximate_index.fallbacks == 10


@needs_faiss
def test_items_added_after_the_index_was_built_are_searched_exactly(exact):
    rec = synthetic_recommender(ITEMS, dim=DIM, index="exact", seed=5)  # its own catalogue: items are appended
    approx = beside(rec, "hnsw", IndexSettings(margin=0))
    history = ["i3", "i7", "i11"]
    user = rec.encode_user(history)
    norm = rec.catalogue.snapshot().vectors.norm(dim=1).max()
    best = 2 * norm * user / user.norm()  # scores above every item of the catalogue for this user
    added = torch.stack([best, -best, torch.zeros(DIM)])
    rec.catalogue.append(["new-best", "new-worst", "new-zero"], added, [None] * 3, [None] * 3)
    got = approx.recommend(history, k=5)
    assert got[0].item_id == "new-best"
    assert [r.item_id for r in got] == [r.item_id for r in rec.recommend(history, k=5)]
    assert approx.approximate_index.count == ITEMS and approx.approximate_index.fallbacks == 0
    # An added item in the history is excluded like any other.
    again = approx.recommend_many([history + ["new-best"]], k=ITEMS + 3)[0].items
    assert "new-best" not in {r.item_id for r in again} and len(again) == ITEMS + 3 - 4


@needs_faiss
def test_auto_is_exact_up_to_the_threshold_and_approximate_above(exact, caplog, monkeypatch):
    small = IndexSettings(exact_max_items=ITEMS)
    assert beside(exact, "auto", small).index == "exact" and beside(exact, "auto", small).approximate_index is None
    above = beside(exact, "auto", IndexSettings(exact_max_items=ITEMS - 1))
    assert above.index == AUTO_KIND and above.approximate_index is not None
    assert exact.index == "exact"  # built with index="exact"
    assert resolve_index("auto", AUTO_EXACT_MAX_ITEMS, IndexSettings()) == "exact"
    assert resolve_index("auto", AUTO_EXACT_MAX_ITEMS + 1, IndexSettings()) == AUTO_KIND
    assert Recommender.__init__.__kwdefaults__["index"] == "auto"
    # Without faiss, auto serves exactly and says why (a slower answer rather than none).
    monkeypatch.setitem(sys.modules, "faiss", None)
    with caplog.at_level(logging.WARNING, logger="pmmrec.inference.ann"):
        assert beside(exact, "auto", IndexSettings(exact_max_items=10)).index == "exact"
    assert "faiss-cpu" in caplog.text


def test_a_bad_index_value_is_a_clear_error(exact, tmp_path):
    with pytest.raises(PmmrecError, match=r"index must be one of auto, exact, hnsw, ivf, got 'annoy'"):
        beside(exact, "annoy")
    # from_checkpoint says so before it reads the checkpoint (or encodes a catalogue)
    with pytest.raises(PmmrecError, match="got 'annoy'"):
        Recommender.from_checkpoint(tmp_path / "missing.pt", index="annoy")
    for bad in ({"exact_max_items": 0}, {"hnsw_m": -1}, {"ivf_nprobe": 1.5}, {"ivf_nlist": 0}):
        with pytest.raises(PmmrecError, match=next(iter(bad))):
            IndexSettings(**bad)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_a_missing_faiss_is_a_clear_error_naming_the_package(exact, monkeypatch, tmp_path, kind):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(PmmrecError, match=f"index '{kind}' needs the package faiss-cpu"):
        beside(exact, kind)
    with pytest.raises(PmmrecError, match="faiss-cpu"):
        Recommender.from_checkpoint(tmp_path / "missing.pt", index=kind)


# ------------------------------------------------------------------------------- a content model: add_items
@pytest.fixture(scope="module")
def checkpoint(quick_world, tmp_path_factory) -> Path:
    from pmmrec.config import load_config
    from pmmrec.training.api import fit

    run = tmp_path_factory.mktemp("ann-run") / "run"
    repo = Path(__file__).resolve().parents[3]
    fit(load_config(repo / "configs" / "tiny.yaml", [f"data.domain={quick_world / 'target'}", f"run.dir={run}",
                                                     "train.epochs=1", "train.max_steps=1"]))
    return run / "checkpoints" / "last.pt"


@needs_faiss
def test_an_item_added_with_add_items_is_found_by_the_approximate_search(checkpoint, quick_world):
    """A copy of a user's best item (same title and image: the same vector) added through add_items must come
    back beside it: the index was built before it existed, so only the exact search of added items finds it."""
    from pmmrec.data.domain import read_domain
    from pmmrec.data.image_db import ImageDB

    rec = Recommender.from_checkpoint(checkpoint, index="hnsw", index_settings=IndexSettings(margin=0))
    exact = beside(rec, "exact")
    history = list(rec.catalogue.snapshot().ids[:2])
    top = rec.recommend(history, k=1)[0]
    domain = read_domain(quick_world / "target")
    db = ImageDB(quick_world / "target" / "images.lmdb")
    try:
        image = db.get(top.item_id)
    finally:
        db.close()
    title = domain.titles[domain.item_ids.index(top.item_id)]
    rec.add_items([NewItem("copy-of-best", title=title, image=image)])
    got = rec.recommend(history, k=3)
    assert {"copy-of-best", top.item_id} == {r.item_id for r in got[:2]}
    want = exact.recommend(history, k=3)  # the copy and its original tie: their order is unspecified
    assert {r.item_id for r in got[:2]} == {r.item_id for r in want[:2]} and got[2].item_id == want[2].item_id
    torch.testing.assert_close([r.score for r in got], [r.score for r in want], rtol=1e-5, atol=1e-5)
    assert rec.approximate_index.count == len(rec) - 1 and rec.approximate_index.users >= 2


@needs_faiss
def test_serve_builds_the_index_it_is_told(checkpoint, monkeypatch, capsys):
    from pmmrec.cli import main
    from pmmrec.serving import server

    app = server.build_app(str(checkpoint), index="ivf", index_options={"ivf_nprobe": 1})
    assert app.state.recommender.index == "ivf" and app.state.recommender.approximate_index.index.nprobe == 1
    app = server.build_app(str(checkpoint), index_options={"exact_max_items": 10})  # auto: 96 items, above 10
    assert app.state.recommender.index == AUTO_KIND
    seen = {}
    monkeypatch.setattr(server, "serve", lambda checkpoint, **kw: seen.update(kw))
    assert main(["serve", "--checkpoint", str(checkpoint), "--index", "hnsw", "--exact-max-items", "5",
                 "--ef-search", "64", "--nprobe", "8"]) == 0
    assert seen["index"] == "hnsw"
    assert seen["index_options"] == {"exact_max_items": 5, "hnsw_ef_search": 64, "ivf_nprobe": 8}
    assert main(["serve", "--checkpoint", str(checkpoint)]) == 0
    assert seen["index"] == "auto" and seen["index_options"] == {}
    with pytest.raises(SystemExit) as e:
        main(["serve", "--checkpoint", str(checkpoint), "--index", "annoy"])
    assert e.value.code == 2 and "invalid choice: 'annoy'" in capsys.readouterr().err
    monkeypatch.undo()  # the real serve: a bad setting is one line before anything is loaded
    assert main(["serve", "--checkpoint", str(checkpoint), "--nprobe", "0"]) == 2
    assert "ivf_nprobe must be an integer >= 1, got 0" in capsys.readouterr().err


def test_recall_at_k_by_hand():
    assert recall_at_k([["a", "b"], ["c", "x"]], [["b", "a"], ["c", "d"]]) == 0.75  # (2/2 + 1/2) / 2
    assert recall_at_k([["a"], []], [["z"], []]) == 0.0  # a user with nothing to find is left out
    assert recall_at_k([], []) == 1.0


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@needs_faiss
def test_a_built_index_is_cached_and_read_back_for_the_same_vectors(exact, kind, tmp_path):
    """Built once into the cache folder, read back (memory-mapped) over the same vectors with the same answers; the
    search settings are not part of the key; other vectors or build settings build (and cache) another index."""
    vectors = exact.catalogue.snapshot().vectors
    settings = IndexSettings(hnsw_ef_search=64, ivf_nlist=16, ivf_nprobe=4)
    users = torch.randn(20, DIM, generator=torch.Generator().manual_seed(3))
    built = ApproximateIndex(vectors, kind, settings, cache=tmp_path)
    assert not built.cached and [p.name for p in tmp_path.iterdir()] == [built.cache_path.name]
    again = ApproximateIndex(vectors, kind, settings, cache=tmp_path)
    assert again.cached and again.cache_path == built.cache_path
    assert torch.equal(again.candidates(users, 30), built.candidates(users, 30))
    wider = ApproximateIndex(vectors, kind, IndexSettings(hnsw_ef_search=128, ivf_nlist=16, ivf_nprobe=8),
                             cache=tmp_path)
    assert wider.cached and ("efSearch=128" if kind == "hnsw" else "nprobe=8") in wider.describe
    changed = vectors.clone()
    changed[7] += 0.5
    other = ApproximateIndex(changed, kind, settings, cache=tmp_path)
    rebuilt = ApproximateIndex(vectors, kind, IndexSettings(hnsw_m=8, ivf_nlist=8), cache=tmp_path)
    assert not other.cached and not rebuilt.cached
    assert len({built.cache_path, other.cache_path, rebuilt.cache_path}) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (built.cache_path, other.cache_path, rebuilt.cache_path))


@needs_faiss
def test_a_damaged_index_cache_is_rebuilt_and_old_ones_are_pruned(exact, tmp_path, caplog, monkeypatch):
    import pmmrec.inference.ann as ann

    vectors = exact.catalogue.snapshot().vectors
    settings = IndexSettings(ivf_nlist=16, ivf_nprobe=16)
    built = ApproximateIndex(vectors, "ivf", settings, cache=tmp_path)
    data = built.cache_path.read_bytes()
    built.cache_path.write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="pmmrec.inference.ann"):
        again = ApproximateIndex(vectors, "ivf", settings, cache=tmp_path)
    assert not again.cached and "cannot be read" in caplog.text
    assert built.cache_path.read_bytes() == data  # written again, whole
    assert ApproximateIndex(vectors, "ivf", settings, cache=tmp_path).cached
    monkeypatch.setattr(ann, "INDEX_CACHE_KEEP", 2)
    for nlist in (8, 12):
        ApproximateIndex(vectors, "ivf", IndexSettings(ivf_nlist=nlist), cache=tmp_path)
    assert len(list(tmp_path.glob("*.faiss"))) == 2 and not built.cache_path.exists()  # the oldest went


@needs_faiss
def test_an_index_cache_that_cannot_be_written_is_read_and_new_indexes_go_to_the_users_cache(exact, tmp_path,
                                                                                             caplog, monkeypatch):
    """A read-only cache folder (an exported store on a read-only volume) is still read, and an index it lacks is
    cached under $PMMREC_CACHE_DIR, so that the next start reads it back instead of building it again."""
    import pmmrec.inference.ann as ann

    vectors = exact.catalogue.snapshot().vectors
    settings = IndexSettings(ivf_nlist=16, ivf_nprobe=16)
    store, own = tmp_path / "store" / "index", tmp_path / "user-cache"
    monkeypatch.setenv(ann.CACHE_ENV, str(own))
    built = ApproximateIndex(vectors, "ivf", settings, cache=store)  # writable: cached in the store
    assert built.cache_path.parent == store
    monkeypatch.setattr(ann, "can_write", lambda folder: False)  # the store's volume is now read-only
    assert ApproximateIndex(vectors, "ivf", settings, cache=store).cached  # what it holds is still read
    other = IndexSettings(ivf_nlist=8, ivf_nprobe=8)
    with caplog.at_level(logging.INFO, logger="pmmrec.inference.ann"):
        first = ApproximateIndex(vectors, "ivf", other, cache=store)
    assert not first.cached and first.cache_path.is_file() and first.cache_path.is_relative_to(own / "index")
    assert f"index cache {store} cannot be written" in caplog.text and "could not write" not in caplog.text
    again = ApproximateIndex(vectors, "ivf", other, cache=store)
    assert again.cached and again.cache_path == first.cache_path
    assert sorted(p.name for p in store.iterdir()) == [built.cache_path.name]  # nothing written to the store


def test_can_write_looks_at_the_nearest_folder_that_exists(tmp_path):
    from pmmrec.inference.ann import can_write

    assert can_write(tmp_path) and can_write(tmp_path / "not" / "yet")  # made on first write
    (tmp_path / "file").write_text("x")
    assert not can_write(tmp_path / "file") and not can_write(tmp_path / "file" / "index")


def test_user_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    from pmmrec.inference.ann import CACHE_ENV, user_cache_dir

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert user_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir() == tmp_path / "xdg" / "pmmrec"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir() == tmp_path / "home" / ".cache" / "pmmrec"
