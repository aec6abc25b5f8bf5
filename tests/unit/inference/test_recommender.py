"""Recommender: raw-id recommendations, unknown ids, new items through the one ItemEncoder, persistence."""

import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pmmrec import NewItem, Recommender
from pmmrec.config import load_config
from pmmrec.data.domain import read_domain
from pmmrec.data.image_db import ImageDB
from pmmrec.errors import PmmrecError
from pmmrec.inference import CannotAddItemsError, DuplicateItemsError, UnknownItemsError, UnknownItemWarning
from pmmrec.inference.export import export_store
from pmmrec.inference.vector_store import VectorStore
from pmmrec.training.api import fit

REPO = Path(__file__).resolve().parents[3]


def train_tiny(domain: Path, run: Path, *overrides: str) -> Path:
    config = load_config(REPO / "configs" / "tiny.yaml", [f"data.domain={domain}", f"run.dir={run}",
                                                         "train.epochs=1", "train.max_steps=2", *overrides])
    fit(config)
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def checkpoint(quick_world, tmp_path_factory) -> Path:
    return train_tiny(quick_world / "target", tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def rec(checkpoint) -> Recommender:
    return Recommender.from_checkpoint(checkpoint)


def _catalogue_item(domain: Path, index: int) -> tuple[str, str, bytes]:
    d = read_domain(domain)
    db = ImageDB(domain / "images.lmdb")
    try:
        return d.item_ids[index], d.titles[index], db.get(d.item_ids[index])
    finally:
        db.close()


def test_recommend_returns_raw_ids_best_first_without_the_history(rec):
    ids = rec.catalogue.snapshot().ids
    history = ids[:5]
    recs = rec.recommend(history, k=7)
    assert len(recs) == 7 and all(r.item_id in rec for r in recs)
    assert not set(history) & {r.item_id for r in recs}
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    # The scores are user . item over the catalogue: check against a direct computation.
    user = rec.encode_user(history)
    vectors = rec.catalogue.snapshot().vectors
    expected = [float(user @ vectors[rec.item(r.item_id).number]) for r in recs]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_include_history_and_k_larger_than_the_catalogue(rec):
    history = rec.catalogue.snapshot().ids[:3]
    everything = rec.recommend(history, k=10_000, exclude_history=False)
    assert len(everything) == len(rec) and set(history) <= {r.item_id for r in everything}
    assert len(rec.recommend(history, k=10_000)) == len(rec) - 3


def test_unknown_ids_skip_with_warning_or_reject(rec):
    known = rec.catalogue.snapshot().ids[:2]
    with pytest.warns(UnknownItemWarning, match="'nope'"):
        skipped = rec.recommend([known[0], "nope", known[1]], k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert skipped == rec.recommend(known, k=3)
    with pytest.raises(UnknownItemsError, match="'nope'"):
        rec.recommend([known[0], "nope"], unknown_items="reject")
    with pytest.raises(PmmrecError, match="no item of the history"):
        rec.recommend(["nope"])
    with pytest.raises(PmmrecError, match="not one string"):
        rec.recommend("a b c")
    with pytest.raises(PmmrecError, match="k must be a positive"):
        rec.recommend(known, k=0)


def test_new_item_is_encoded_exactly_like_a_catalogue_item(rec, quick_world):
    """One item path: a catalogue item's title and image given as a new item give the catalogue's vector."""
    item_id, title, image = _catalogue_item(quick_world / "target", 4)
    vector = rec.encode_items([NewItem("copy", title=title, image=image)])[0]
    torch.testing.assert_close(vector, rec.catalogue.snapshot().vectors[rec.item(item_id).number], atol=1e-5,
                               rtol=1e-5)


def test_added_items_are_recommendable_at_once(checkpoint, quick_world, tmp_path):
    rec = Recommender.from_checkpoint(checkpoint)
    item_id, title, image = _catalogue_item(quick_world / "target", 7)
    image_file = tmp_path / "new.png"
    image_file.write_bytes(image)
    before = len(rec)
    assert rec.add_items([NewItem("twin", title=title, image=image_file), NewItem("text_only", title="sea")]) \
        == ["twin", "text_only"]
    assert len(rec) == before + 2 and "twin" in rec
    info = rec.item("twin")
    assert info.added and info.has_image and info.title == title and rec.item_image("twin") == image
    assert not rec.item("text_only").has_image and rec.item_image(item_id) == image
    # The twin has its original's vector, so it is ranked right next to it for any history.
    ranked = [r.item_id for r in rec.recommend(rec.catalogue.snapshot().ids[:3], k=len(rec))]
    assert abs(ranked.index("twin") - ranked.index(item_id)) == 1


def test_add_items_errors(rec, quick_world):
    existing = rec.catalogue.snapshot().ids[0]
    cases = [
        ([NewItem(existing, title="x")], DuplicateItemsError, "already in the catalogue"),
        ([NewItem("a b", title="x")], PmmrecError, "without whitespace"),
        ([NewItem("", title="x")], PmmrecError, "non-empty"),
        ([NewItem("n1", title="x"), NewItem("n1", title="y")], PmmrecError, "given twice"),
        ([NewItem("n2")], PmmrecError, "a title, an image, or both"),
        ([NewItem("n3", image=b"not an image")], PmmrecError, "'n3'.*not an image"),
        ([NewItem("n4", image=quick_world / "missing.png")], PmmrecError, "cannot read image"),
    ]
    for items, error, message in cases:
        with pytest.raises(error, match=message):
            rec.add_items(items)
    assert "n1" not in rec and "n2" not in rec  # a failed call adds nothing


def test_id_tower_recommends_but_cannot_add_items(quick_world, tmp_path):
    rec = Recommender.from_checkpoint(train_tiny(quick_world / "target", tmp_path / "id", "model.item_tower=id"))
    history = rec.catalogue.snapshot().ids[:3]
    assert len(rec.recommend(history, k=5)) == 5 and rec.item(history[0]).title  # titles from the domain
    with pytest.raises(CannotAddItemsError, match="model.item_tower=id"):
        rec.add_items([NewItem("new", title="anything")])


def test_text_model_needs_titles(quick_world, tmp_path):
    rec = Recommender.from_checkpoint(train_tiny(quick_world / "target", tmp_path / "t", "model.modality=text"))
    with pytest.raises(PmmrecError, match="give a title"):
        rec.add_items([NewItem("new", image=b"\x89PNG")])
    rec.add_items([NewItem("new", title="sea wave")])
    assert "new" in rec


def test_persisted_items_survive_a_restart(checkpoint, quick_world, tmp_path):
    domain = tmp_path / "target"
    shutil.copytree(quick_world / "target", domain)
    rec = Recommender.from_checkpoint(checkpoint, domain)
    _, title, image = _catalogue_item(domain, 3)
    rec.add_items([NewItem("kept", title=title + "\tnew", image=image)], persist=True)
    with pytest.raises(PmmrecError, match="needs a title"):
        rec.add_items([NewItem("untitled", image=image)], persist=True)
    assert "untitled" not in rec
    again = Recommender.from_checkpoint(checkpoint, domain)
    assert "kept" in again and again.item("kept").title == title + " new" and again.item("kept").has_image
    torch.testing.assert_close(again.catalogue.snapshot().vectors[-1], rec.catalogue.snapshot().vectors[-1],
                               atol=1e-5, rtol=1e-5)
    assert read_domain(domain).item_ids[-1] == "kept"


def test_concurrent_adds_and_recommendations_stay_consistent(checkpoint):
    rec = Recommender.from_checkpoint(checkpoint)
    history = rec.catalogue.snapshot().ids[:4]
    start = len(rec)
    errors: list[BaseException] = []

    def add(worker: int) -> None:
        try:
            for i in range(10):
                rec.add_items([NewItem(f"w{worker}_{i}", title=f"sea wave {i}")])
        except BaseException as e:  # reported below
            errors.append(e)

    def recommend() -> None:
        try:
            for _ in range(30):
                snap_size = len(rec)
                recs = rec.recommend(history, k=1000)
                assert len(recs) >= snap_size - len(history)
                assert len({r.item_id for r in recs}) == len(recs)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=add, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=recommend) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert len(rec) == start + 30
    snap = rec.catalogue.snapshot()
    numbers = [snap.number(f"w{w}_{i}") for w in range(3) for i in range(10)]
    assert sorted(numbers) == list(range(start + 1, start + 31))
    assert len(rec.recommend(history, k=10_000)) == len(rec) - len(history)


def test_export_embeddings_with_a_faiss_index(checkpoint, rec, tmp_path):
    done = export_store(checkpoint, tmp_path / "items", faiss_out=tmp_path / "items.faiss", faiss_kind="flat",
                        progress=False)
    stored = VectorStore(tmp_path / "items").read()
    vectors, ids = np.asarray(stored.vectors), stored.ids
    assert vectors.shape == (len(rec), rec.catalogue.dim) == (done.count, done.dim) and len(ids) == len(rec)
    np.testing.assert_allclose(vectors[5], rec.catalogue.snapshot().vectors[rec.item(ids[5]).number].numpy(),
                               atol=1e-6, rtol=1e-5)
    faiss = pytest.importorskip("faiss")
    index = faiss.deserialize_index(np.frombuffer((tmp_path / "items.faiss").read_bytes(), dtype=np.uint8))
    _, found = index.search(vectors[:3], 1)  # inner product: the best row for a query is not always itself
    assert index.ntotal == len(rec) and found[:, 0].tolist() == (vectors[:3] @ vectors.T).argmax(1).tolist()
    with pytest.raises(PmmrecError, match=r"writes a vector store, a folder"):
        export_store(checkpoint, tmp_path / "items.npy")


def test_an_exported_hnsw_index_is_built_as_the_service_builds_it():
    faiss = pytest.importorskip("faiss")
    from pmmrec.inference.ann import IndexSettings
    from pmmrec.inference.export import build_faiss_index

    vectors = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    index = build_faiss_index(vectors, "hnsw")
    defaults = IndexSettings()
    assert index.ntotal == 50 and index.hnsw.efConstruction == defaults.hnsw_ef_construction
    assert index.hnsw.efSearch == defaults.hnsw_ef_search
    def bottom_neighbours(index) -> int:  # M: the bottom layer holds 2 M neighbours a node
        return int(faiss.vector_to_array(index.hnsw.cum_nneighbor_per_level)[1])

    assert bottom_neighbours(index) == 2 * defaults.hnsw_m
    index = build_faiss_index(vectors, "hnsw", IndexSettings(hnsw_m=8, hnsw_ef_search=20))
    assert bottom_neighbours(index) == 16 and index.hnsw.efSearch == 20
