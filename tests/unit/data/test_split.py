"""Leave-one-out with whole histories and with the reference code's cut, and namespaced merging of domains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmmrec.data.domain import Domain, check_images, read_domain
from pmmrec.data.split import leave_one_out, merge_domains
from pmmrec.errors import ConfigError, DataError, PmmrecError


def _domain(sequences: list[list[int]], num_items: int, name: str = "d") -> Domain:
    ids = [chr(ord("a") + k) if num_items <= 26 else f"i{k}" for k in range(num_items)]
    return Domain(name, ids, [f"title {i}" for i in ids], [f"u{k}" for k in range(len(sequences))],
                  [np.asarray(s, dtype=np.int64) for s in sequences])


def test_hand_example():
    # Items a..g = 1..7. max_seq_len 2 keeps the last 5 items of each sequence.
    d = _domain([[1, 2, 3, 4, 5, 6],  # u0: cut to b c d e f; "a" falls off
                 [7, 1],  # u1: shorter than 3, dropped (so g and a never occur)
                 [6, 2, 3]], 7)  # u2
    s = leave_one_out(d, max_seq_len=2, min_seq_len=3, history="reference")
    assert s.item_ids == ["b", "c", "d", "e", "f"]  # renumbered 1..5 in the original order
    assert s.titles == ["title b", "title c", "title d", "title e", "title f"]
    assert s.item_index.tolist() == [0, 2, 3, 4, 5, 6]
    assert s.user_ids == ["u0", "u2"] and s.num_dropped_users == 1
    # u0 = [1 2 3 4 5]: train seq[:-2], valid seq[-4:-1], test seq[-3:]
    assert [t.tolist() for t in s.train] == [[1, 2, 3], [5]]
    assert [v.tolist() for v in s.valid] == [[2, 3, 4], [5, 1]]
    assert [t.tolist() for t in s.test] == [[3, 4, 5], [5, 1, 2]]
    assert s.train_counts.tolist() == [0, 1, 1, 1, 0, 1]
    assert s.image_sources == [(None, i) for i in "bcdef"]
    assert s.num_items == 5 and s.num_users == 2
    assert all(a.dtype == np.int64 for a in s.train + s.valid + s.test)


def test_bad_settings_and_no_users():
    d = _domain([[1, 2, 3]], 3)
    with pytest.raises(ConfigError, match="min_seq_len"):
        leave_one_out(d, min_seq_len=2)
    with pytest.raises(ConfigError, match="max_seq_len"):
        leave_one_out(d, max_seq_len=0)
    with pytest.raises(DataError, match="at least 4"):
        leave_one_out(d, min_seq_len=4)


def test_split_of_a_real_folder(tiny_domain):
    s = leave_one_out(read_domain(tiny_domain), max_seq_len=20)
    assert s.num_users == 4 and s.num_items == 6
    assert s.image_sources[0] == (tiny_domain / "images.lmdb", "i1")
    assert [s.item_ids[t[-1] - 1] for t in s.test] == ["i3", "i5", "i6", "i1"]


@settings(max_examples=200, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(1, 12), max_size=30), min_size=1, max_size=8),
       max_seq_len=st.integers(1, 8), min_seq_len=st.integers(3, 6))
def test_reference_cut_properties(seqs, max_seq_len, min_seq_len):
    d = _domain(seqs, 12)
    kept = [s for s in seqs if len(s) >= min_seq_len]
    if not kept:
        with pytest.raises(DataError):
            leave_one_out(d, max_seq_len, min_seq_len, "reference")
        return
    s = leave_one_out(d, max_seq_len, min_seq_len, "reference")
    assert s.num_dropped_users == len(seqs) - len(kept)
    old = s.item_index
    assert old[0] == 0 and np.all(np.diff(old) > 0)  # original order kept
    cut = [seq[-(max_seq_len + 3):] for seq in kept]
    assert set(old[1:].tolist()) == {i for c in cut for i in c}  # exactly the items of the cut sequences
    for c, train, valid, test in zip(cut, s.train, s.valid, s.test, strict=True):
        assert old[valid[-1]] == c[-2]  # the validation target is the second-to-last item
        assert old[test[-1]] == c[-1]  # the test target is the last one
        # Training stops before the validation target's position: it is exactly the prefix up to n-2.
        assert old[train].tolist() == c[:-2]
        assert old[valid].tolist() == c[-(max_seq_len + 2):-1]
        assert old[test].tolist() == c[-(max_seq_len + 1):]
        assert len(train) <= max_seq_len + 1 and len(valid) <= max_seq_len + 1 and len(test) <= max_seq_len + 1
        assert valid.min() >= 1 and test.max() <= s.num_items
    assert s.train_counts[0] == 0 and s.train_counts.sum() == sum(len(t) for t in s.train)
    assert s.train_counts.tolist() == np.bincount(np.concatenate(s.train), minlength=s.num_items + 1).tolist()


def test_merge_namespaces_ids_and_keeps_image_sources(tmp_path):
    a = _domain([[1, 2, 3]], 3, name="books")
    a.image_db = tmp_path / "books.lmdb"
    b = _domain([[3, 1], [2, 2, 1]], 3, name="films")  # the same raw ids "a".."c" and users "u0"
    m = merge_domains([a, b])
    assert m.item_ids == ["books/a", "books/b", "books/c", "films/a", "films/b", "films/c"]
    assert m.user_ids == ["books/u0", "films/u0", "films/u1"]
    assert [s.tolist() for s in m.sequences] == [[1, 2, 3], [6, 4], [5, 5, 4]]
    assert m.titles[3] == "title a"
    assert m.image_sources == [(tmp_path / "books.lmdb", k) for k in "abc"] + [(None, k) for k in "abc"]
    assert m.name == "books+films" and merge_domains([a], name="x").name == "x"
    # A merged catalogue splits like any other, and its image sources follow the renumbering.
    s = leave_one_out(m, history="reference")
    assert s.image_sources[s.item_ids.index("films/b")] == (None, "b")
    assert "films/c" not in s.item_ids  # only in a sequence too short to keep
    assert "films/c" in leave_one_out(m).item_ids  # whole histories: every item of the domains is ranked


def test_merge_refuses_colliding_names():
    a, b = _domain([[1]], 1, name="x"), _domain([[1]], 1, name="x")
    with pytest.raises(PmmrecError, match="distinct"):
        merge_domains([a, b])
    with pytest.raises(PmmrecError, match="'/'"):
        merge_domains([_domain([[1]], 1, name="a/b")])
    with pytest.raises(PmmrecError, match="at least one"):
        merge_domains([])


def test_merged_images_are_checked_per_source(tiny_domain, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_domain, other)
    shutil.rmtree(other / "images.lmdb")
    m = merge_domains([read_domain(tiny_domain, name="tiny"), read_domain(other, name="other")])
    missing = check_images(m, "blank")
    assert missing == ["tiny/i6"] + [f"other/i{k}" for k in range(1, 7)]
    with pytest.raises(DataError, match="the merged source domains: 7 of 12 items have no image"):
        check_images(m, "error")
    assert isinstance(m.image_sources[0][0], Path)


def test_whole_histories_hand_example():
    # The hand example above, with history=all: nothing is cut and every item of the domain stays.
    d = _domain([[1, 2, 3, 4, 5, 6], [7, 1], [6, 2, 3]], 7)
    s = leave_one_out(d, max_seq_len=2, min_seq_len=3)
    assert s.item_ids == list("abcdefg") and s.item_index.tolist() == list(range(8))  # g occurs in no kept user
    assert [t.tolist() for t in s.train] == [[1, 2, 3, 4], [6]]
    assert [v.tolist() for v in s.valid] == [[3, 4, 5], [6, 2]]  # the last L + 1 inputs, then the target
    assert [t.tolist() for t in s.test] == [[4, 5, 6], [6, 2, 3]]
    assert s.train_counts.tolist() == [0, 1, 1, 1, 1, 0, 1, 0]
    with pytest.raises(ConfigError, match=r"data.history must be one of \['all', 'reference'\], got 'cut'"):
        leave_one_out(d, history="cut")


@settings(max_examples=200, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(1, 12), max_size=30), min_size=1, max_size=8),
       max_seq_len=st.integers(1, 8), min_seq_len=st.integers(3, 6))
def test_whole_history_properties(seqs, max_seq_len, min_seq_len):
    d = _domain(seqs, 12)
    kept = [s for s in seqs if len(s) >= min_seq_len]
    if not kept:
        with pytest.raises(DataError):
            leave_one_out(d, max_seq_len, min_seq_len)
        return
    s = leave_one_out(d, max_seq_len, min_seq_len)
    assert s.num_items == 12 and s.item_index.tolist() == list(range(13))
    for seq, train, valid, test in zip(kept, s.train, s.valid, s.test, strict=True):
        assert train.tolist() == seq[:-2] and valid[-1] == seq[-2] and test[-1] == seq[-1]
        assert test.tolist() == seq[-(max_seq_len + 1):]
    assert s.train_counts.sum() == sum(len(seq) - 2 for seq in kept)
