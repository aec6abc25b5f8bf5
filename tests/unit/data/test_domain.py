"""The domain folder reader: every bad input is a DataError naming the file, the line and the field."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmmrec.data.domain import read_domain, write_domain
from pmmrec.errors import DataError


def _folder(tmp_path: Path, items: str | bytes, users: str | bytes) -> Path:
    root = tmp_path / "dom"
    root.mkdir(exist_ok=True)
    for name, text in (("items.tsv", items), ("users.tsv", users)):
        data = text.encode("utf-8") if isinstance(text, str) else text
        (root / name).write_bytes(data)
    return root


ITEMS = "item_id\ttitle\na\tApple\nb\tBanana\nc\tCherry\n"


def test_a_good_folder_reads(tmp_path):
    root = _folder(tmp_path, ITEMS, "user_id\titem_ids\nu1\ta b c\nu2\tc a\n")
    d = read_domain(root)
    assert d.item_ids == ["a", "b", "c"] and d.titles == ["Apple", "Banana", "Cherry"]
    assert d.user_ids == ["u1", "u2"]
    assert [s.tolist() for s in d.sequences] == [[1, 2, 3], [3, 1]]
    assert d.name == "dom" and d.image_db is None
    assert (d.num_items, d.num_users, d.num_interactions) == (3, 2, 5)


def test_headers_are_optional_and_a_bom_is_ignored(tmp_path):
    root = _folder(tmp_path, "\ufeffa\tApple\nb\tBanana\n", "u1\tb a\n")
    d = read_domain(root)
    assert d.item_ids == ["a", "b"] and [s.tolist() for s in d.sequences] == [[2, 1]]


def test_the_reference_code_names_are_read(tmp_path):
    root = tmp_path / "ref"
    root.mkdir()
    (root / "Scientific_items_texts.tsv").write_text("v1\tA title\nv2\tAnother\n", encoding="utf-8")
    (root / "Scientific_users.tsv").write_text("u1\tv1 v2 v1\n", encoding="utf-8")
    d = read_domain(root)
    assert d.item_ids == ["v1", "v2"] and d.sequences[0].tolist() == [1, 2, 1]


def test_unknown_item_names_file_line_and_item(tmp_path):
    root = _folder(tmp_path, ITEMS, "user_id\titem_ids\nu1\ta b\nu2\tc zz\nu3\tqq a\n")
    with pytest.raises(DataError) as e:
        read_domain(root)
    message = str(e.value)
    assert str(root / "users.tsv") in message
    assert "line 3: 'zz'" in message and "line 4: 'qq'" in message
    assert e.value.field == "items"


def test_many_unknown_items_are_summarised(tmp_path):
    users = "".join(f"u{k}\tx{k}\n" for k in range(8))
    with pytest.raises(DataError, match=r"and 3 more"):
        read_domain(_folder(tmp_path, ITEMS, users))


@pytest.mark.parametrize(("items", "users", "file", "line", "match"), [
    ("a\tA\nb\tB\na\tC\n", "u\ta\n", "items.tsv", 3, r"duplicate item id 'a' \(first on line 1\)"),
    ("a\tA\nb\t  \n", "u\ta\n", "items.tsv", 2, "empty title for item 'b'"),
    ("a\tA\nb\n", "u\ta\n", "items.tsv", 2, "missing column"),
    ("a\tA\n\tB\n", "u\ta\n", "items.tsv", 2, "empty item id"),
    (ITEMS, "u1\ta\nu2\tb\tc\n", "users.tsv", 2, "got 3 column"),
    (ITEMS, "u1\ta\nu2 b c\n", "users.tsv", 2, "got 1 column"),
    (ITEMS, "u1\ta\nu1\tb\n", "users.tsv", 2, r"duplicate user id 'u1' \(first on line 1\)"),
    (ITEMS, "u1\ta\n\tb\n", "users.tsv", 2, "empty user id"),
    (b"a\tA\nb\tB\xff\xfe\n", "u\ta\n", "items.tsv", 2, "invalid UTF-8"),
    (ITEMS, b"u1\ta\nu2\tb\nu3\t\xc3\n", "users.tsv", 3, "invalid UTF-8"),
])
def test_bad_lines(tmp_path, items, users, file, line, match):
    root = _folder(tmp_path, items, users)
    with pytest.raises(DataError, match=match) as e:
        read_domain(root)
    assert (Path(e.value.path), e.value.line) == (root / file, line)
    assert f"{root / file}:{line}" in str(e.value)


def test_empty_title_allowed_when_asked(tmp_path):
    root = _folder(tmp_path, "a\tA\nb\t\n", "u\ta b\n")
    assert read_domain(root, empty_title="blank").titles == ["A", ""]


def test_empty_tables(tmp_path):
    with pytest.raises(DataError, match="no items"):
        read_domain(_folder(tmp_path, "item_id\ttitle\n\n", "u\ta\n"))
    with pytest.raises(DataError, match="no users"):
        read_domain(_folder(tmp_path, ITEMS, "user_id\titem_ids\n"))


def test_not_a_domain_folder(tmp_path):
    with pytest.raises(DataError, match="domain folder not found"):
        read_domain(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "items.tsv").write_text(ITEMS, encoding="utf-8")
    with pytest.raises(DataError, match="not a domain folder"):
        read_domain(tmp_path / "half")


def test_missing_images(tiny_domain, tmp_path):
    with pytest.raises(DataError, match=r"images.lmdb: 1 of 6 items have no image: 'i6'; the model reads images "
                                        r"\(model.modality vision or multimodal\); set data.missing_image: blank"):
        read_domain(tiny_domain, missing_image="error")
    assert read_domain(tiny_domain, missing_image="blank").image_db == tiny_domain / "images.lmdb"
    text_only = _folder(tmp_path, ITEMS, "u\ta\n")
    with pytest.raises(DataError, match=r"no image database \(images.lmdb\), so none of its 3 items has an image "
                                        r"\('a', 'b', 'c'\).*or add one with pmmrec data build-images"):
        read_domain(text_only, missing_image="error")
    read_domain(text_only)  # no check by default (text-only use)


def test_write_then_read_round_trips(tiny_domain, tmp_path):
    d = read_domain(tiny_domain)
    d.titles[0] = "tabs\tand\nnewlines"
    write_domain(d, tmp_path / "copy")
    back = read_domain(tmp_path / "copy")
    assert back.item_ids == d.item_ids and back.user_ids == d.user_ids
    assert back.titles[0] == "tabs and newlines"
    assert all(np.array_equal(a, b) for a, b in zip(back.sequences, d.sequences, strict=True))


@settings(max_examples=150, deadline=None)
@given(items=st.binary(max_size=200), users=st.binary(max_size=200))
def test_fuzzed_files_fail_cleanly(items, users):
    """Whatever the bytes, reading either works or raises a DataError: never another exception."""
    with tempfile.TemporaryDirectory() as tmp:
        root = _folder(Path(tmp), items, users)
        try:
            d = read_domain(root, empty_title="blank")
        except DataError:
            return
        assert all(s.min() >= 1 and s.max() <= d.num_items for s in d.sequences if len(s))


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(st.text(alphabet=st.sampled_from("ab \t\r\x85\u2028x"), max_size=12), max_size=6))
def test_fuzzed_text_lines_fail_cleanly(lines):
    with tempfile.TemporaryDirectory() as tmp:
        root = _folder(Path(tmp), ITEMS + "\n".join(lines) + "\n", "u\ta\n" + "\n".join(lines))
        with contextlib.suppress(DataError):
            read_domain(root, empty_title="blank")
