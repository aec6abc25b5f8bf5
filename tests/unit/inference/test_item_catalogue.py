"""The catalogue's per-item bookkeeping: image references held compactly, flags, appended items."""

from pathlib import Path

import lmdb
import torch

from pmmrec.inference.catalogue import Catalogue, ImageRefs


def test_image_refs_keep_each_items_database_and_key_including_keys_that_are_not_the_id():
    a, b = Path("/data/a.lmdb"), Path("/data/b.lmdb")
    refs = ImageRefs(["x", "y", "z", "w"], [(a, "x"), None, (b, "old-z"), (None, "w")])
    assert [refs.get(i, iid) for i, iid in enumerate(["x", "y", "z", "w"])] == [(a, "x"), None, (b, "old-z"),
                                                                                (None, "w")]
    refs.append("v", None)
    refs.append("u", (a, "u"))
    assert len(refs) == 6 and refs.get(4, "v") is None and refs.get(5, "u") == (a, "u")
    assert refs._dbs == [a, b, None] and refs._keys == {2: "old-z"}  # one entry a database, keys only where needed


def test_catalogue_reads_images_through_its_references_and_flags_added_items(tmp_path):
    db_path = tmp_path / "images.lmdb"
    env = lmdb.open(str(db_path), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"k-b", b"bytes of b")
        txn.put(b"c", b"bytes of c")
    env.close()
    ids = ["a", "b", "c"]
    refs = [None, (db_path, "k-b"), (db_path, "c")]
    # images_present: the ids whose image exists (a serving catalogue is one domain: its keys are its ids)
    cat = Catalogue(ids, torch.randn(4, 3), ["A", "B", "C"], refs, images_present={"b", "c"})
    assert cat.image("b") == b"bytes of b" and cat.image("c") == b"bytes of c" and cat.image("a") is None
    info = cat.info("b")
    assert info.has_image is True and info.added is False and info.title == "B" and info.number == 2
    assert cat.info("a").has_image is False
    cat.append(["d", "e"], torch.randn(2, 3), ["D", None], [b"png of d", None])
    assert cat.image("d") == b"png of d" and cat.image("e") is None
    assert cat.info("d").added is True and cat.info("d").has_image is True and cat.info("e").has_image is False
    assert len(cat) == 5 and cat.snapshot().number("e") == 5
