"""The catalogue's packed ids and titles (inference/item_ids.py): look-ups, appends, collisions, snapshots."""

import gc
import tracemalloc
import weakref

import numpy as np
import pytest
import torch

from pmmrec.inference import item_ids as item_ids_module
from pmmrec.inference.catalogue import Catalogue
from pmmrec.inference.item_ids import DuplicateItemsError, ItemIds, PackedStrings

IDS = [f"item{k:06d}" for k in range(500)] + ["café", "日本語", "x", "🙂", "a b", "ÿ", "\ud800lone"]


class _List(list):
    """A list a weak reference can follow."""


def test_every_id_has_its_number_and_back():
    table = ItemIds(IDS)
    assert len(table) == len(IDS)
    for number, iid in enumerate(IDS, start=1):
        assert table.number(iid) == number and table.item_id(number) == iid
    np.testing.assert_array_equal(table.numbers(IDS[::-1]), np.arange(len(IDS), 0, -1))


def test_unknown_ids_have_no_number():
    table = ItemIds(IDS)
    unknown = ["item000500", "item00000", "item0000000", "", "cafe", "日本", "\ud800", "X"]
    assert [table.number(u) for u in unknown] == [None] * len(unknown)
    np.testing.assert_array_equal(table.numbers(unknown + ["x"]), [0] * len(unknown) + [IDS.index("x") + 1])
    with pytest.raises(IndexError):
        table.item_id(0)
    with pytest.raises(IndexError):
        table.item_id(len(IDS) + 1)


def test_appended_ids_are_numbered_after_the_base_and_refused_twice():
    table = ItemIds(IDS[:3])
    table.append(["new1", "новый"])
    assert table.number("new1") == 4 and table.number("новый") == 5 and table.item_id(5) == "новый"
    np.testing.assert_array_equal(table.numbers(["новый", IDS[0], "none", "new1"]), [5, 1, 0, 4])
    with pytest.raises(DuplicateItemsError, match="'new1'"):
        table.append(["fresh", "new1"])
    with pytest.raises(DuplicateItemsError, match=repr(IDS[1])):
        table.append([IDS[1]])
    with pytest.raises(DuplicateItemsError, match="'twice'"):
        table.append(["twice", "twice"])
    assert len(table) == 5 and table.number("fresh") is None and table.number("twice") is None  # nothing appended


def test_an_id_given_twice_at_build_is_an_error():
    with pytest.raises(DuplicateItemsError, match="'b'"):
        ItemIds(["a", "b", "c", "b"])


@pytest.mark.parametrize("collide", [lambda s: 7, lambda s: len(s) % 3])
def test_colliding_hashes_are_told_apart_by_the_string(monkeypatch, collide):
    monkeypatch.setattr(item_ids_module, "_hash", collide)
    table = ItemIds(IDS)
    assert [table.number(i) for i in IDS] == list(range(1, len(IDS) + 1))
    np.testing.assert_array_equal(table.numbers(IDS), np.arange(1, len(IDS) + 1))
    assert table.number("item999999") is None and table.numbers(["item999999", "zz"]).tolist() == [0, 0]
    table.append(["late"])
    assert table.number("late") == len(IDS) + 1 and table.numbers(["late"]).tolist() == [len(IDS) + 1]
    with pytest.raises(DuplicateItemsError, match="'b'"):
        ItemIds(["a", "b", "ccc", "b"])  # found among the colliding ids


def test_the_callers_list_is_not_kept():
    ids = _List(f"id{k}" for k in range(1000))
    gone = weakref.ref(ids)
    table = ItemIds(ids)
    titles = PackedStrings(ids)
    del ids
    gc.collect()
    assert gone() is None and table.item_id(1000) == "id999" and titles[3] == "id3"


def test_titles_keep_none_apart_from_empty_and_read_back_in_slices():
    values = ["Sea wave ship", None, "", "Über café", None, "plain"]
    titles = PackedStrings(values)
    assert [titles[k] for k in range(6)] == values and titles.strings(0, 6) == values
    assert titles.strings(1, 3) == [None, ""] and titles.strings(3, 3) == []
    titles.append(None)
    titles.append("later")
    assert len(titles) == 8 and titles[6] is None and titles.strings(4, 8) == [None, "plain", None, "later"]
    ascii_only = PackedStrings(["a", "", "bc"])
    assert ascii_only.strings(0, 3) == ["a", "", "bc"] and ascii_only.blob.tobytes() == b"abc"
    with pytest.raises(IndexError):
        titles[-1]


def test_a_catalogue_without_titles_packs_nothing_and_takes_titles_later():
    titles = PackedStrings([None] * 1000)
    assert titles.nbytes == 4 and titles[999] is None and titles.strings(998, 1000) == [None, None]
    titles.append("")
    assert titles[1000] == "" and titles.strings(999, 1001) == [None, ""]
    cat = Catalogue(["a", "b"], torch.randn(3, 2))
    cat.append(["c"], torch.randn(1, 2), ["C"], [None])
    assert cat.info("a").title is None and cat.info("c").title == "C"
    with pytest.raises(TypeError):
        ItemIds(["a", None])
    with pytest.raises(TypeError):
        ItemIds([None])


def test_a_snapshot_shows_only_its_own_items():
    cat = Catalogue(IDS[:4], torch.randn(5, 3), ["t0", None, "", "t3"])
    old = cat.snapshot()
    cat.append(["late", "später"], torch.randn(2, 3), [None, "Spät"], [None, None])
    new = cat.snapshot()
    assert old.number("late") is None and old.numbers(["late", IDS[2]]).tolist() == [0, 3]
    assert len(old.ids) == 4 and list(old.ids) == IDS[:4] and old.ids[:] == IDS[:4] and "late" not in old.ids
    with pytest.raises(IndexError):
        old.item_id(5)
    with pytest.raises(IndexError):
        old.ids[4]
    assert new.number("später") == 6 and new.item_id(5) == "late" and new.ids[-2:] == ["late", "später"]
    assert new.ids[3:] == [IDS[3], "late", "später"] and new.ids[::2] == [IDS[0], IDS[2], "late"]
    assert [cat.info(i).title for i in IDS[:4] + ["late", "später"]] == ["t0", None, "", "t3", None, "Spät"]


def test_an_empty_catalogue_takes_items():
    cat = Catalogue([], torch.zeros(1, 4))
    snap = cat.snapshot()
    assert len(cat) == 0 and snap.number("a") is None and snap.numbers(["a"]).tolist() == [0] and snap.ids[:] == []
    cat.append(["a"], torch.ones(1, 4), ["A"], [None])
    assert cat.snapshot().number("a") == 1 and cat.info("a").title == "A" and list(snap.ids) == []


def test_iteration_crosses_the_decoding_blocks():
    ids = [f"i{k}" for k in range(70_000)] + ["é"]  # past one 65,536-id block, and not all ASCII
    view = ItemIds(ids).view(len(ids))
    assert list(view) == ids and view[65_535:65_538] == ids[65_535:65_538]


def test_ids_and_titles_cost_their_bytes_not_python_objects():
    n = 20_000
    ids = [f"item{k:06d}" for k in range(n)]  # 10 bytes
    titles = [f"title of item number {k:06d} in the shop" for k in range(n)]  # 40 bytes
    vectors = torch.zeros(n + 1, 2)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cat = Catalogue(ids, vectors, titles)
        del ids, titles
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 50 bytes of text, 4 + 4 of offsets, 8 of hash and 4 of number, 4 of image reference and 2 one-byte flags:
    # 76 an item (measured: 75.4). The former list, dict and str objects took 222 (tracing from before the inputs).
    assert held / n < 85, held / n
    assert cat.snapshot().item_id(n) == "item019999"
