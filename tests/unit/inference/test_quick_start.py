"""Restarts from the vector store's start-up cache (docs/design.md §8): the quick path when nothing changed, and
every change that must still be seen (an image, a title, the checkpoint, a damaged store or cache)."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.unit.inference.conftest import copy_checkpoint, set_image, set_title, vectors_of
from tests.unit.inference.test_shared_store import _mapped_file
from tests.unit.serving.test_service import train_tiny

from pmmrec import NewItem, Recommender
from pmmrec.data.domain import read_domain
from pmmrec.data.image_db import ImageDB
from pmmrec.data.item_features import ImageTable
from pmmrec.errors import PmmrecError
from pmmrec.inference import catalogue_vectors, start_cache
from pmmrec.inference.catalogue import DuplicateItemsError
from pmmrec.inference.catalogue_vectors import default_store_path
from pmmrec.inference.recommender import sync_store
from pmmrec.inference.start import DeferredModel
from pmmrec.inference.start_cache import CACHE, IMAGE_DIGESTS, StartCache, file_identity
from pmmrec.inference.vector_store import StoreKey, VectorStore
from pmmrec.models.loading import read_checkpoint
from pmmrec.models.pmmrec import PMMRec

HISTORY_LEN = 5


@pytest.fixture(scope="module")
def trained(quick_world, tmp_path_factory) -> Path:
    return train_tiny(quick_world / "target", tmp_path_factory.mktemp("runs") / "a", "train.max_steps=2")


@pytest.fixture
def checkpoint(trained, tmp_path) -> Path:
    return copy_checkpoint(trained, tmp_path)


@pytest.fixture(autouse=True)
def settled(monkeypatch):
    """Files written by the test a moment ago count as settled (the racy-write margin is tested on its own)."""
    monkeypatch.setattr(start_cache, "RACY_S", -60.0)


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How many items were encoded, and how often every image was hashed or every encoder tensor."""
    counts = {"encoded": 0, "image_digests": 0, "weights": 0}
    encode, digests, weights = PMMRec.encode_items, ImageTable.content_digests, catalogue_vectors.tensors_fingerprint

    def encoding(self, items):
        counts["encoded"] += len(items.items)
        return encode(self, items)

    def hashing_images(self):
        counts["image_digests"] += 1
        return digests(self)

    def hashing_weights(named):
        counts["weights"] += 1
        return weights(named)

    monkeypatch.setattr(PMMRec, "encode_items", encoding)
    monkeypatch.setattr(ImageTable, "content_digests", hashing_images)
    monkeypatch.setattr(catalogue_vectors, "tensors_fingerprint", hashing_weights)
    return counts


def _reset(counts: dict[str, int]) -> None:
    for name in counts:
        counts[name] = 0


def _image(domain: Path, item_id: str) -> bytes:
    db = ImageDB(domain / "images.lmdb")
    try:
        return db.get(item_id)
    finally:
        db.close()


def test_a_restart_with_nothing_changed_reads_the_store_and_builds_no_item_encoder(checkpoint, domain, counted):
    first = Recommender.from_checkpoint(checkpoint, domain)
    assert counted["encoded"] == 96 and isinstance(first.model, PMMRec)
    store = default_store_path(checkpoint, domain)
    assert set(json.loads((store / CACHE).read_text())) >= {"images", "weights", "catalogue"}
    _reset(counted)
    again = Recommender.from_checkpoint(checkpoint, domain)
    assert isinstance(again.model, DeferredModel) and not again.model.loaded
    assert counted == {"encoded": 0, "image_digests": 0, "weights": 0}
    assert torch.equal(vectors_of(again), vectors_of(first))
    ids = read_domain(domain).item_ids
    history = ids[3:3 + HISTORY_LEN]
    assert again.recommend(history, k=10) == first.recommend(history, k=10)  # same items, same scores
    assert again.item(ids[0]).title == first.item(ids[0]).title and again.item(ids[0]).has_image
    # Adding an item builds the item encoder then, and encodes it as the full model does.
    new = NewItem("fresh1", title="a ship on a calm sea", image=_image(domain, ids[7]))
    expected = first.encode_items([new])
    again.add_items([new])
    assert again.model.loaded
    torch.testing.assert_close(vectors_of(again)[again.item("fresh1").number], expected[0])
    assert VectorStore(store).read().ids[-1] == "fresh1"


def test_a_changed_image_is_encoded_again(checkpoint, domain, counted):
    before = vectors_of(Recommender.from_checkpoint(checkpoint, domain))
    ids = read_domain(domain).item_ids
    set_image(domain, ids[20], _image(domain, ids[40]))
    _reset(counted)
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert isinstance(rec.model, PMMRec)  # the database changed: the full path
    assert counted["encoded"] == 1 and counted["image_digests"] == 1  # every image hashed again, one re-encoded
    changed = rec.item(ids[20]).number
    assert not torch.allclose(vectors_of(rec)[changed], before[changed])
    _reset(counted)
    again = Recommender.from_checkpoint(checkpoint, domain)  # recorded again: quick once more
    assert isinstance(again.model, DeferredModel) and counted["encoded"] == 0
    assert torch.equal(vectors_of(again), vectors_of(rec))


def test_a_changed_title_is_encoded_again_and_the_images_are_not_hashed_again(checkpoint, domain, counted):
    Recommender.from_checkpoint(checkpoint, domain)
    ids = read_domain(domain).item_ids
    set_title(domain, ids[10], "a brand new title about the sea")
    _reset(counted)
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert isinstance(rec.model, PMMRec) and counted["encoded"] == 1
    assert counted["image_digests"] == 0 and counted["weights"] == 0  # both recorded, their files unchanged
    fresh = Recommender.from_checkpoint(checkpoint, domain, store=None)
    torch.testing.assert_close(vectors_of(rec), vectors_of(fresh), atol=1e-6, rtol=1e-5)


def test_a_damaged_image_digest_cache_is_computed_again(checkpoint, domain, counted):
    Recommender.from_checkpoint(checkpoint, domain)
    store = default_store_path(checkpoint, domain)
    data = bytearray((store / IMAGE_DIGESTS).read_bytes())
    data[-1] ^= 0xFF  # one digest byte: same size, only the checksum sees it
    (store / IMAGE_DIGESTS).write_bytes(bytes(data))
    ids = read_domain(domain).item_ids
    set_title(domain, ids[10], "another title")  # the full path, which reads the image digests
    _reset(counted)
    Recommender.from_checkpoint(checkpoint, domain)
    assert counted["image_digests"] == 1 and counted["encoded"] == 1  # not 2: the bad digest was not used


def test_a_touched_checkpoint_is_hashed_again(checkpoint, domain, counted):
    Recommender.from_checkpoint(checkpoint, domain)
    os.utime(checkpoint)  # same bytes, new modification time: no longer known to be the recorded file
    _reset(counted)
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert isinstance(rec.model, PMMRec) and counted["weights"] == 1 and counted["encoded"] == 0
    _reset(counted)
    again = Recommender.from_checkpoint(checkpoint, domain)
    assert isinstance(again.model, DeferredModel) and counted == {"encoded": 0, "image_digests": 0, "weights": 0}


def test_other_overrides_take_the_full_path(checkpoint, domain, counted):
    Recommender.from_checkpoint(checkpoint, domain)
    _reset(counted)
    rec = Recommender.from_checkpoint(checkpoint, domain, overrides=["text.max_tokens=4"])
    assert isinstance(rec.model, PMMRec) and counted["encoded"] == 96  # another key: the store is rebuilt


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_store_is_caught_by_the_quick_path_and_rebuilt(checkpoint, domain, counted, caplog, damage):
    good = vectors_of(Recommender.from_checkpoint(checkpoint, domain))
    vectors_file = default_store_path(checkpoint, domain) / "000001.vectors.npy"
    data = vectors_file.read_bytes()
    if damage == "truncate":
        vectors_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        vectors_file.write_bytes(data[:-9] + bytes([data[-9] ^ 0x40]) + data[-8:])
    else:
        vectors_file.unlink()
    _reset(counted)
    with caplog.at_level(logging.WARNING, logger="pmmrec"):
        rec = Recommender.from_checkpoint(checkpoint, domain)
    assert counted["encoded"] == 96 and isinstance(rec.model, PMMRec)
    assert any("unusable, rebuilding" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(vectors_of(rec), good, atol=1e-6, rtol=1e-5)


def test_files_changed_a_moment_ago_are_not_recorded(checkpoint, domain, counted, monkeypatch):
    """The racy-write margin: a write in the same clock tick as the recorded identity would go unseen, so files
    changed within RACY_S seconds are computed again by the next start instead of being recorded."""
    monkeypatch.setattr(start_cache, "RACY_S", 3600.0)  # everything in this test is younger than an hour
    Recommender.from_checkpoint(checkpoint, domain)
    cache = default_store_path(checkpoint, domain) / CACHE
    assert not cache.exists() or not set(json.loads(cache.read_text())) & {"images", "weights", "catalogue"}
    _reset(counted)
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert isinstance(rec.model, PMMRec) and counted["image_digests"] == 1 and counted["weights"] == 1


def test_the_weights_digest_is_keyed_by_the_checkpoint_file_and_overrides(checkpoint, tmp_path):
    cache = StartCache(VectorStore(tmp_path / "store"))
    calls = []

    def compute(value="w1"):
        calls.append(value)
        return value

    identity = file_identity(checkpoint)
    assert cache.weights_digest(identity, [], compute) == "w1" and len(calls) == 1
    assert StartCache(VectorStore(tmp_path / "store")).weights_digest(identity, [], compute) == "w1"
    assert len(calls) == 1  # recorded, read back by another start
    cache.weights_digest(identity, ["text.max_tokens=4"], compute)
    assert len(calls) == 2
    os.utime(checkpoint)
    assert cache.weights_digest(identity, [], lambda: compute("w2")) == "w2"  # identity taken before the change
    assert cache.weights_digest(file_identity(checkpoint), [], lambda: compute("w3")) == "w3"
    assert cache.weights_digest(file_identity(checkpoint), [], compute) == "w3" and len(calls) == 4
    assert cache.weights_digest(None, [], lambda: compute("w4")) == "w4"  # no file: nothing to key it by


def test_a_deferred_item_encoder_that_would_make_other_vectors_is_an_error(checkpoint, domain, counted):
    Recommender.from_checkpoint(checkpoint, domain)  # records the catalogue
    store = VectorStore(default_store_path(checkpoint, domain))
    loaded = read_checkpoint(checkpoint)
    wrong = StoreKey("0" * 32, loaded.config.model.dim)
    model = DeferredModel(loaded, wrong, torch.device("cpu"), StartCache(store))
    states = model.encode_sequences(torch.zeros(1, 3, wrong.dim), torch.ones(1, 3, dtype=torch.bool))
    assert states.shape == (1, 3, wrong.dim)  # the user encoder needs no item encoder
    with pytest.raises(PmmrecError, match="does not make the vectors the catalogue is served with"):
        model.full()
    _reset(counted)
    rec = Recommender.from_checkpoint(checkpoint, domain)  # the record was dropped: every item checked again
    assert isinstance(rec.model, PMMRec) and counted["encoded"] == 0  # the full path, the store still matching


def test_the_store_accepts_its_start_up_cache_files(checkpoint, domain):
    Recommender.from_checkpoint(checkpoint, domain)
    store = VectorStore(default_store_path(checkpoint, domain))
    assert (store.path / CACHE).is_file() and (store.path / IMAGE_DIGESTS).is_file()
    store.check_writable()  # not taken for a user's files
    stored = store.read()
    store.write(stored.key, stored.ids, stored.digests, np.asarray(stored.vectors))
    assert (store.path / CACHE).is_file()  # a rewrite leaves them (they are keyed by what they depend on)


def test_a_store_committed_after_the_record_was_checked_takes_the_full_path(checkpoint, domain, counted):
    """The record names the store version it describes: a store read at another version (a writer committed
    between the check of the manifest and the read) is not served by the quick path."""
    Recommender.from_checkpoint(checkpoint, domain)
    cache = default_store_path(checkpoint, domain) / CACHE
    data = json.loads(cache.read_text())
    data["catalogue"]["version"] += 1
    cache.write_text(json.dumps(data))
    _reset(counted)
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert isinstance(rec.model, PMMRec) and counted["encoded"] == 0


def test_a_changed_users_file_is_validated_again_and_decides_no_vector(checkpoint, domain, counted):
    """users.tsv decides no item's vector: a changed one keeps the quick path, which validates it as the full
    path does (an unknown item in it is the error it always was)."""
    Recommender.from_checkpoint(checkpoint, domain)
    ids = read_domain(domain).item_ids
    with open(domain / "users.tsv", "a") as f:
        f.write(f"late_user\t{ids[0]} {ids[1]}\n")
    _reset(counted)
    rec = Recommender.from_checkpoint(checkpoint, domain)
    assert isinstance(rec.model, DeferredModel) and counted == {"encoded": 0, "image_digests": 0, "weights": 0}
    with open(domain / "users.tsv", "a") as f:
        f.write("later_user\tno_such_item\n")
    with pytest.raises(PmmrecError, match="no_such_item"):
        Recommender.from_checkpoint(checkpoint, domain)


def test_workers_sharing_the_store_start_quickly_and_add_items_through_it(checkpoint, domain, counted):
    """serve --workers N: the sync before the workers is a start (quick when recorded), and each worker maps the
    store with a deferred item encoder, also once other workers appended items (the manifest changed); the next
    start of the server takes the full path once, which drops the items not persisted, as before."""
    first = Recommender.from_checkpoint(checkpoint, domain)
    store = default_store_path(checkpoint, domain)
    _reset(counted)
    assert sync_store(checkpoint, domain) == store  # recorded: the quick path, nothing hashed or encoded
    assert counted == {"encoded": 0, "image_digests": 0, "weights": 0}
    a = Recommender.from_checkpoint(checkpoint, domain, shared=True)
    b = Recommender.from_checkpoint(checkpoint, domain, shared=True)
    for worker in (a, b):
        assert isinstance(worker.model, DeferredModel) and not worker.model.loaded
        assert worker.shared_store is not None
        assert _mapped_file(worker.catalogue.snapshot().items.blocks[0]) == str(store / "000001.vectors.npy")
    assert counted == {"encoded": 0, "image_digests": 0, "weights": 0}
    assert torch.equal(vectors_of(a), vectors_of(first))
    ids = read_domain(domain).item_ids
    history = ids[3:3 + HISTORY_LEN]
    assert a.recommend(history, k=10) == first.recommend(history, k=10)
    new = NewItem("fresh1", title="a ship on a calm sea", image=_image(domain, ids[7]))
    expected = first.encode_items([new])
    assert a.add_items([new]) == ["fresh1"] and a.model.loaded and not b.model.loaded
    with pytest.raises(DuplicateItemsError):
        b.add_items([new])  # b had not looked yet: encoded (its item encoder built), then refused under the lock
    assert b.model.loaded and b.item("fresh1").added and b.refresh() == 0  # picked up while adding
    torch.testing.assert_close(vectors_of(b)[b.item("fresh1").number], expected[0])
    # A worker started after the append (uvicorn replaced one) still starts quickly, with the added item.
    _reset(counted)
    c = Recommender.from_checkpoint(checkpoint, domain, shared=True)
    assert isinstance(c.model, DeferredModel) and "fresh1" in c and counted["weights"] == 0
    # The next server start: the manifest changed, so the full path, which syncs the store with the domain.
    _reset(counted)
    assert sync_store(checkpoint, domain) == store
    assert counted["weights"] == 0 and counted["image_digests"] == 0 and counted["encoded"] == 0
    assert VectorStore(store).read().ids == ids  # the item added without persisting is dropped
    again = Recommender.from_checkpoint(checkpoint, domain, shared=True)
    assert isinstance(again.model, DeferredModel) and "fresh1" not in again
