"""Several processes over one vector store (docs/design.md §8): the vectors memory-mapped, not copied; items one
process adds are picked up by the others; an id is added once, whoever asks (pmmrec.inference.shared_store)."""

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.unit.serving.test_service import train_tiny

from pmmrec import NewItem, Recommender
from pmmrec.data.image_db import ImageDB
from pmmrec.errors import PmmrecError
from pmmrec.inference import vector_store as vs
from pmmrec.inference.ann import IndexSettings
from pmmrec.inference.catalogue import DuplicateItemsError
from pmmrec.inference.export import export_store
from pmmrec.inference.recommender import CannotAddItemsError, sync_store
from pmmrec.inference.shared_store import StoreDiverged
from pmmrec.inference.vector_store import VectorStore


@pytest.fixture(scope="module")
def checkpoint(quick_world, tmp_path_factory) -> Path:
    return train_tiny(quick_world / "target", tmp_path_factory.mktemp("run") / "run")


@pytest.fixture
def image(quick_world) -> bytes:
    db = ImageDB(quick_world / "target" / "images.lmdb")
    try:
        return db.get("ta3")
    finally:
        db.close()


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``tensor``'s first byte (Linux /proc/self/maps), or None."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 else None
    return None


def _shared(checkpoint: Path, domain: Path, store: Path, **kwargs) -> Recommender:
    return Recommender.from_checkpoint(checkpoint, domain, store=store, shared=True, **kwargs)


def test_the_store_is_mapped_and_items_added_by_one_are_found_by_the_other(checkpoint, domain, tmp_path, image):
    store = tmp_path / "store"
    a, b = _shared(checkpoint, domain, store), _shared(checkpoint, domain, store)
    base = a.catalogue.snapshot().items.blocks[0]
    assert len(base) == 96 and _mapped_file(base) == str(store / "000001.vectors.npy")
    assert _mapped_file(b.catalogue.snapshot().items.blocks[0]) == str(store / "000001.vectors.npy")
    history = list(a.catalogue.snapshot().ids[:3])
    before = [r.item_id for r in b.recommend(history, k=5)]

    assert a.add_items([NewItem("new1", title="sea wave ship", image=image)]) == ["new1"]
    assert "new1" not in b and b.refresh() == 1 and b.refresh() == 0
    info = b.item("new1")
    assert info.title == "sea wave ship" and info.added and info.has_image and b.item_image("new1") == image
    assert b.shared_store.version == a.shared_store.version == 2
    torch.testing.assert_close(b.catalogue.snapshot().vectors[-1], a.catalogue.snapshot().vectors[-1], rtol=0,
                               atol=0)
    got = b.recommend(history, k=len(b))
    assert [r.item_id for r in got] == [r.item_id for r in a.recommend(history, k=len(a))]
    assert "new1" in {r.item_id for r in got} and len(before) == 5
    # Both processes' scoring reads the base from the file: nothing copied it.
    assert _mapped_file(b.catalogue.snapshot().items.blocks[0]) == str(store / "000001.vectors.npy")


def test_an_id_added_elsewhere_meanwhile_is_refused_and_the_store_keeps_one_copy(checkpoint, domain, tmp_path):
    store = tmp_path / "store"
    a, b = _shared(checkpoint, domain, store), _shared(checkpoint, domain, store)
    a.add_items([NewItem("dup", title="from a")])
    with pytest.raises(DuplicateItemsError, match="'dup'"):  # b has not looked at the store since: the lock check
        b.add_items([NewItem("dup", title="from b"), NewItem("other", title="x")])
    assert b.item("dup").title == "from a" and "other" not in b  # caught up, added nothing
    stored = VectorStore(store).read()  # every file checked
    assert stored.ids.count("dup") == 1 and "other" not in stored.ids and len(stored.ids) == 97


def test_a_process_started_later_serves_the_items_added_before(checkpoint, domain, tmp_path):
    store = tmp_path / "store"
    a = _shared(checkpoint, domain, store)
    a.add_items([NewItem("early", title="red apple pie")])
    late = _shared(checkpoint, domain, store)  # the store holds every domain item: taken as it is, not synced
    assert late.item("early").title == "red apple pie" and late.item("early").added
    assert VectorStore(store).read().ids[-1] == "early"  # not dropped by the late start
    # A start that does sync (pmmrec serve, before its workers) brings the store in step with the domain again.
    assert sync_store(checkpoint, domain, store=store) == store
    assert "early" not in VectorStore(store).read().ids


def test_merged_segments_are_followed(checkpoint, domain, tmp_path, monkeypatch):
    monkeypatch.setattr(vs, "MAX_SEGMENTS", 3)
    store = tmp_path / "store"
    a, b = _shared(checkpoint, domain, store), _shared(checkpoint, domain, store)
    a.add_items([NewItem("n0", title="zero")])
    assert b.refresh() == 1
    for k in range(1, 6):  # appends past 3 segments merge the ones after the base
        a.add_items([NewItem(f"n{k}", title=f"title {k}")])
    assert len(VectorStore(store).manifest()["segments"]) < 6
    assert b.refresh() == 5
    assert list(b.catalogue.snapshot().ids[96:]) == [f"n{k}" for k in range(6)]
    torch.testing.assert_close(b.catalogue.snapshot().vectors, a.catalogue.snapshot().vectors, rtol=0, atol=0)
    assert b.item("n4").title == "title 4"


def test_a_rewritten_store_is_not_followed(checkpoint, domain, tmp_path):
    store = tmp_path / "store"
    a = _shared(checkpoint, domain, store)
    stored = VectorStore(store).read()
    VectorStore(store).write(stored.key, stored.ids[:10], stored.digests[:10], np.asarray(stored.vectors[:10]))
    with pytest.raises(StoreDiverged, match="rewritten"):
        a.refresh()
    assert len(a) == 96
    with pytest.raises(PmmrecError, match="rewritten"):
        a.add_items([NewItem("x", title="y")])


def test_an_exported_store_shared_by_processes_takes_persisted_items_only(checkpoint, domain, tmp_path):
    exported = tmp_path / "exported"
    export_store(checkpoint, exported, domain, progress=False)
    a = Recommender.from_checkpoint(checkpoint, domain, embeddings=exported, shared=True)
    b = Recommender.from_checkpoint(checkpoint, domain, embeddings=exported, shared=True)
    with pytest.raises(CannotAddItemsError, match="persist"):
        a.add_items([NewItem("p1", title="sea wave")])
    a.add_items([NewItem("p1", title="sea wave")], persist=True)
    assert b.refresh() == 1 and b.item("p1").title == "sea wave"
    assert VectorStore(exported).read().ids[-1] == "p1"
    assert (domain / "items.tsv").read_text().splitlines()[-1] == "p1\tsea wave"  # and into the domain folder



def test_a_persisted_add_that_failed_after_writing_the_domain_can_be_retried(checkpoint, domain, tmp_path,
                                                                             monkeypatch):
    """The domain folder is written before the store: if the store then fails, the retry rewrites the item's line
    in items.tsv instead of adding a second one (a duplicate id would make the domain unreadable at the next start)."""
    from pmmrec.data.domain import read_items
    from pmmrec.inference.shared_store import SharedStore

    exported = tmp_path / "exported"
    export_store(checkpoint, exported, domain, progress=False)
    rec = Recommender.from_checkpoint(checkpoint, domain, embeddings=exported, shared=True)
    real = SharedStore.append

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SharedStore, "append", full_disk)
    with pytest.raises(PmmrecError, match="No space left"):
        rec.add_items([NewItem("p1", title="sea wave")], persist=True)
    assert (domain / "items.tsv").read_text().splitlines()[-1] == "p1\tsea wave"  # the domain was written
    monkeypatch.setattr(SharedStore, "append", real)
    rec.add_items([NewItem("p1", title="sea  wave, again")], persist=True)
    ids, titles = read_items(domain / "items.tsv")  # raises on a duplicate id
    assert ids.count("p1") == 1 and titles[ids.index("p1")] == "sea wave, again"
    assert VectorStore(exported).read().ids[-1] == "p1"

def _add_in_child(checkpoint, domain, store, title, barrier, results) -> None:
    rec = Recommender.from_checkpoint(checkpoint, domain, store=store, shared=True)
    barrier.wait(60)  # both loaded (neither has seen the other's item), then both add
    try:
        rec.add_items([NewItem("same", title=title)])
        results.put(("added", title))
    except DuplicateItemsError:
        results.put(("conflict", title))
    except Exception as e:  # anything else fails the test, with what it was
        results.put(("error", repr(e)))


@pytest.mark.slow  # two fresh interpreters import torch and load the model: about 10-15 s
def test_two_processes_adding_one_id_at_once_one_wins(checkpoint, domain, tmp_path):
    store = tmp_path / "store"
    sync_store(checkpoint, domain, store=store)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    children = [context.Process(target=_add_in_child, args=(checkpoint, domain, store, title, barrier, results))
                for title in ("first", "second")]
    for child in children:
        child.start()
    outcomes = sorted(results.get(timeout=120) for _ in children)
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert [o[0] for o in outcomes] == ["added", "conflict"]
    winner = next(title for outcome, title in outcomes if outcome == "added")
    stored = VectorStore(store).read()  # the manifest and every file checked
    assert stored.ids.count("same") == 1 and len(stored.ids) == 97
    rec = Recommender.from_checkpoint(checkpoint, domain, store=store, shared=True)
    assert rec.item("same").title == winner


def test_an_approximate_index_searches_the_items_picked_up_beside_it(checkpoint, domain, tmp_path):
    pytest.importorskip("faiss")
    store = tmp_path / "store"
    a = _shared(checkpoint, domain, store)
    b = _shared(checkpoint, domain, store, index="hnsw")
    a.add_items([NewItem("new1", title="sea wave ship")])
    assert b.refresh() == 1 and b.approximate_index.count == 96  # the index stays as built
    history = list(b.catalogue.snapshot().ids[:3])
    exact = Recommender(b.model, b.config, b.catalogue, index="exact")
    assert [r.item_id for r in b.recommend(history, k=10)] == [r.item_id for r in exact.recommend(history, k=10)]
    assert "new1" in {r.item_id for r in b.recommend(history, k=97)}


def test_serve_builds_the_workers_index_before_they_start(checkpoint, domain, tmp_path):
    """`pmmrec serve --workers N --index hnsw` builds the index once, in the child that syncs the store; every
    worker then reads it back from the store's cache instead of building its own."""
    pytest.importorskip("faiss")
    from pmmrec.serving.server import _sync_stores

    store = tmp_path / "store"
    _sync_stores(str(checkpoint), str(domain), str(store), None, None, "hnsw", {"hnsw_m": 8})
    assert len(list((store / "index").glob("*.faiss"))) == 1
    worker = Recommender.from_checkpoint(checkpoint, domain, store=store, shared=True, index="hnsw",
                                         index_settings=IndexSettings(hnsw_m=8))
    assert worker.approximate_index.cached
    worker.close()
    _sync_stores(str(checkpoint), str(domain), str(store), None, None, "auto", None)  # exact at this size: none
    assert len(list((store / "index").glob("*.faiss"))) == 1


def test_serve_builds_the_index_of_an_exported_store_before_the_workers(checkpoint, domain, tmp_path):
    pytest.importorskip("faiss")
    from pmmrec.serving.server import _sync_stores

    exported = tmp_path / "exported"
    export_store(checkpoint, exported, domain, progress=False)
    _sync_stores(str(checkpoint), None, "auto", None, str(exported), "hnsw", {"hnsw_m": 8})  # no domain: optional
    assert len(list((exported / "index").glob("*.faiss"))) == 1
    worker = Recommender.from_checkpoint(checkpoint, None, embeddings=exported, shared=True, index="hnsw",
                                         index_settings=IndexSettings(hnsw_m=8))
    assert worker.approximate_index.cached
    worker.close()
