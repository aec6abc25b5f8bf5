"""Recommender.from_checkpoint with the catalogue vector store: restarts encode nothing, only new or changed items
are encoded, another model's or a damaged store is rebuilt, added items are appended (docs/design.md §8)."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.unit.inference.conftest import copy_checkpoint, set_image, set_title, vectors_of
from tests.unit.serving.test_service import train_tiny

from pmmrec import NewItem, Recommender
from pmmrec.data.domain import read_domain
from pmmrec.data.image_db import ImageDB
from pmmrec.errors import PmmrecError
from pmmrec.inference.catalogue_vectors import default_store_path
from pmmrec.inference.export import export_store
from pmmrec.inference.vector_store import StoreKey, VectorStore
from pmmrec.models.pmmrec import PMMRec


@pytest.fixture(scope="module")
def checkpoints(quick_world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"a": train_tiny(quick_world / "target", root / "a", "train.max_steps=2"),
            "b": train_tiny(quick_world / "target", root / "b", "train.max_steps=2", "seed=7")}


@pytest.fixture
def checkpoint(checkpoints, tmp_path) -> Path:
    """Checkpoint "a" copied, so that its default store (beside it) is this test's own."""
    return copy_checkpoint(checkpoints["a"], tmp_path)


@pytest.fixture
def encoded(monkeypatch) -> list[int]:
    """How many items each call of the item encoder encodes, in order (any Recommender built in the test)."""
    calls: list[int] = []
    original = PMMRec.encode_items

    def counting(self, items):
        calls.append(len(items.items))
        return original(self, items)

    monkeypatch.setattr(PMMRec, "encode_items", counting)
    return calls


def test_a_restart_reads_the_store_and_encodes_nothing(checkpoint, domain, encoded):
    first = Recommender.from_checkpoint(checkpoint, domain)
    assert sum(encoded) == 96
    store = default_store_path(checkpoint, domain)
    assert store.parent == checkpoint.parent / "last.vectors" and store.name.startswith("target-")
    assert VectorStore(store).read().ids == read_domain(domain).item_ids
    encoded.clear()
    again = Recommender.from_checkpoint(checkpoint, domain)
    assert encoded == []
    assert torch.equal(vectors_of(again), vectors_of(first))
    # Without a store everything is encoded, to the same vectors.
    plain = Recommender.from_checkpoint(checkpoint, domain, store=None)
    assert sum(encoded) == 96
    torch.testing.assert_close(vectors_of(plain), vectors_of(first), atol=1e-6, rtol=1e-5)


def test_only_changed_items_are_encoded(checkpoint, domain, encoded):
    before = vectors_of(Recommender.from_checkpoint(checkpoint, domain))
    ids = read_domain(domain).item_ids
    db = ImageDB(domain / "images.lmdb")
    other_image = db.get(ids[40])
    db.close()
    set_title(domain, ids[10], "a brand new title about the sea")
    set_image(domain, ids[20], other_image)
    encoded.clear()
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert sum(encoded) == 2  # the retitled item and the re-imaged one, nothing else
    after = vectors_of(rec)
    changed = [rec.item(ids[10]).number, rec.item(ids[20]).number]
    same = [n for n in range(1, 97) if n not in changed]
    assert torch.equal(after[same], before[same])
    assert not torch.allclose(after[changed[0]], before[changed[0]])
    fresh = vectors_of(Recommender.from_checkpoint(checkpoint, domain, store=None))
    torch.testing.assert_close(after, fresh, atol=1e-6, rtol=1e-5)
    encoded.clear()
    Recommender.from_checkpoint(checkpoint, domain)  # the store was brought up to date
    assert encoded == []


def test_items_new_at_the_end_are_encoded_and_appended(checkpoint, domain, encoded):
    Recommender.from_checkpoint(checkpoint, domain)
    ids = read_domain(domain).item_ids
    with open(domain / "items.tsv", "a") as f:
        f.write("late1\tsea wave ship\n")
    db = ImageDB(domain / "images.lmdb")
    image = db.get(ids[0])
    db.close()
    set_image(domain, "late1", image)
    encoded.clear()
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert sum(encoded) == 1 and "late1" in rec
    stored = VectorStore(default_store_path(checkpoint, domain)).read()
    assert stored.version == 2 and len(stored.segments) == 2 and stored.ids[-1] == "late1"


def test_a_store_of_another_model_is_rebuilt_with_a_log_line(checkpoints, domain, tmp_path, encoded, caplog):
    store = tmp_path / "shared-store"
    Recommender.from_checkpoint(checkpoints["a"], domain, store=store)
    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="pmmrec"):
        b = Recommender.from_checkpoint(checkpoints["b"], domain, store=store)
    assert sum(encoded) == 96
    line = next(r.getMessage() for r in caplog.records if "another model" in r.getMessage())
    assert "rebuilding" in line and "item-encoder weights digest" in line
    assert VectorStore(store).key().weights != StoreKey("", 0).weights
    torch.testing.assert_close(vectors_of(b), vectors_of(Recommender.from_checkpoint(checkpoints["b"], domain,
                                                                                 store=None)), atol=1e-6, rtol=1e-5)
    # Other preprocessing of the same weights: rebuilt too, the line names the setting.
    caplog.clear()
    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="pmmrec"):
        Recommender.from_checkpoint(checkpoints["b"], domain, store=store, overrides=["text.max_tokens=4"])
    assert sum(encoded) == 96
    assert any("inputs.max_tokens 16 in the store, 4 for the model" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest", "delete"])
def test_a_damaged_store_is_rebuilt_never_served(checkpoint, domain, encoded, caplog, damage):
    good = vectors_of(Recommender.from_checkpoint(checkpoint, domain))
    store = default_store_path(checkpoint, domain)
    vectors_file = store / "000001.vectors.npy"
    data = vectors_file.read_bytes()
    if damage == "truncate":
        vectors_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # one byte of one vector, same size: only the checksum sees it
        vectors_file.write_bytes(data[:-9] + bytes([data[-9] ^ 0x40]) + data[-8:])
    elif damage == "manifest":
        (store / "store.json").write_text("{not json")
    else:
        vectors_file.unlink()
    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="pmmrec"):
        rec = Recommender.from_checkpoint(checkpoint, domain)
    assert sum(encoded) == 96
    assert any("unusable, rebuilding" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(vectors_of(rec), good, atol=1e-6, rtol=1e-5)
    VectorStore(store).read()  # whole again


def test_an_unwritable_store_folder_serves_from_memory(checkpoint, domain, tmp_path, caplog):
    (tmp_path / "a-file").write_text("x")
    with caplog.at_level(logging.WARNING, logger="pmmrec"):
        rec = Recommender.from_checkpoint(checkpoint, domain, store=tmp_path / "a-file" / "store")
    assert len(rec) == 96 and rec.store is None
    assert any("could not write the vector store" in r.getMessage() for r in caplog.records)
    rec.add_items([NewItem("n1", title="sea")])  # no store to append to: fine
    assert "n1" in rec


def _catalogue_item(domain: Path, index: int) -> tuple[str, bytes]:
    d = read_domain(domain)
    db = ImageDB(domain / "images.lmdb")
    try:
        return d.titles[index], db.get(d.item_ids[index])
    finally:
        db.close()


def test_added_items_go_into_the_store_and_a_restart_reuses_them(checkpoint, domain, encoded):
    rec = Recommender.from_checkpoint(checkpoint, domain)
    title, image = _catalogue_item(domain, 3)
    rec.add_items([NewItem("kept", title=title, image=image)], persist=True)
    rec.add_items([NewItem("gone", title="sea wave")])  # not persisted: in the store until the next start
    store = VectorStore(default_store_path(checkpoint, domain))
    assert store.read().ids[-2:] == ["kept", "gone"] and store.read().version == 3
    encoded.clear()
    again = Recommender.from_checkpoint(checkpoint, domain)
    assert encoded == []  # "kept" comes from the store: its content digest is the persisted item's
    assert "kept" in again and "gone" not in again
    assert torch.equal(again.catalogue.snapshot().vectors[again.item("kept").number],
                       rec.catalogue.snapshot().vectors[rec.item("kept").number])
    assert store.read().ids == read_domain(domain).item_ids  # rewritten in the domain's order, "gone" dropped


@pytest.fixture
def exported(checkpoint, domain, tmp_path) -> Path:
    out = tmp_path / "exported"
    done = export_store(checkpoint, out, domain, progress=False)
    assert done.count == 96 and done.encoded == 96 and done.dim == 32
    return out


def test_embeddings_are_served_as_exported(checkpoint, domain, exported, encoded):
    rec = Recommender.from_checkpoint(checkpoint, domain, embeddings=exported)
    assert encoded == [] and len(rec) == 96
    ids = read_domain(domain).item_ids
    np.testing.assert_array_equal(rec.item_vectors()[1], VectorStore(exported).read().vectors)
    assert rec.item(ids[0]).title == read_domain(domain).titles[0] and rec.item(ids[0]).has_image
    # Persisted additions go into the exported store (it is the catalogue); others stay in memory.
    title, image = _catalogue_item(domain, 5)
    rec.add_items([NewItem("kept", title=title, image=image)], persist=True)
    rec.add_items([NewItem("memory", title="sea")])
    assert VectorStore(exported).read().ids[-1] == "kept"
    again = Recommender.from_checkpoint(checkpoint, embeddings=exported, domain=domain)
    assert "kept" in again and "memory" not in again and again.item("kept").title == title


def test_embeddings_of_another_model_are_an_error_naming_both(checkpoints, checkpoint, domain, exported):
    a = VectorStore(exported).key()
    with pytest.raises(PmmrecError, match=rf"weights {a.weights}, but the checkpoint .* has weights [0-9a-f]{{32}}"):
        Recommender.from_checkpoint(checkpoints["b"], domain, embeddings=exported)
    stored = VectorStore(exported).read()
    VectorStore(exported).write(StoreKey(a.weights, 16, a.model, a.inputs), stored.ids, stored.digests,
                                np.zeros((96, 16), dtype=np.float32))
    with pytest.raises(PmmrecError, match=r"dimension 16, but the checkpoint .* makes vectors of dimension 32"):
        Recommender.from_checkpoint(checkpoint, domain, embeddings=exported)
    (exported / "000002.vectors.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(PmmrecError, match="--embeddings .*bytes, the manifest says"):
        Recommender.from_checkpoint(checkpoint, domain, embeddings=exported)


def test_content_and_id_vectors_keep_their_id_rows(quick_world, domain, tmp_path, encoded):
    """``content+id``: an item's vector includes its trained ID row; re-encoding a changed item alone (from a
    feature store of that item only) must add the right row, as encoding the whole catalogue does."""
    checkpoint = train_tiny(quick_world / "target", tmp_path / "hybrid", "train.max_steps=2", "model.item_tower=content+id",
                            "train.lr=0.05")
    Recommender.from_checkpoint(checkpoint, domain)
    ids = read_domain(domain).item_ids
    set_title(domain, ids[70], "retitled forest owl")
    encoded.clear()
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert sum(encoded) == 1
    fresh = Recommender.from_checkpoint(checkpoint, domain, store=None)
    torch.testing.assert_close(vectors_of(rec), vectors_of(fresh), atol=1e-6, rtol=1e-5)
    ids_table = fresh.model.item_encoder.id_embedding.weight
    assert ids_table[71].abs().max() > 1e-3  # the row added is not zero: a wrong row would show


def test_an_approximate_index_is_kept_in_the_store_and_read_back(checkpoint, domain):
    pytest.importorskip("faiss")
    first = Recommender.from_checkpoint(checkpoint, domain, index="hnsw")
    index = first.approximate_index
    assert not index.cached and index.cache_path.parent == default_store_path(checkpoint, domain) / "index"
    again = Recommender.from_checkpoint(checkpoint, domain, index="hnsw")
    assert again.approximate_index.cached and again.approximate_index.cache_path == index.cache_path
    history = [read_domain(domain).item_ids[0]]
    assert [r.item_id for r in again.recommend(history, k=5)] == \
        [r.item_id for r in first.recommend(history, k=5)]
    set_title(domain, read_domain(domain).item_ids[3], "a title never seen before")
    changed = Recommender.from_checkpoint(checkpoint, domain, index="hnsw")
    assert not changed.approximate_index.cached  # one vector changed: another index
