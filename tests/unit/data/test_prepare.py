"""``prepare_domain``: raw interaction + metadata files -> domain folders, with every bad input named."""

from __future__ import annotations

import gzip
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pmmrec.data import prepare as prepare_module
from pmmrec.data.domain import read_domain
from pmmrec.data.prepare import REPORT_FILE, prepare_domain
from pmmrec.data.tables import PrepareColumns
from pmmrec.errors import DataError, PmmrecError

MOVIES = """movie_id,title,genres
1,Toy Story (1995),Animation|Children's|Comedy
2,"Shawshank Redemption, The (1994)",Drama
3,Heat (1995),Action|Crime|Thriller
4,"Sabrina, ""the"" remake (1995)",Comedy|Romance
5,Never Rated (1999),Drama
"""


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _image(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt)
    return buf.getvalue()


def _ratings(rows: list[tuple], header: str = "user_id,movie_id,rating,timestamp") -> str:
    return header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)


def _users(folder: Path) -> dict[str, list[str]]:
    lines = (folder / "users.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return {u: items.split() for u, items in (line.split("\t") for line in lines)}


def _items(folder: Path) -> list[tuple[str, str]]:
    lines = (folder / "items.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t")) for line in lines]


@pytest.fixture
def movies(tmp_path) -> Path:
    return _write(tmp_path / "in" / "movies.csv", MOVIES)


def _prepare(tmp_path, rows, movies, **kw):
    ratings = _write(tmp_path / "in" / "ratings.csv", _ratings(rows))
    out = kw.pop("out", tmp_path / "out")
    kw.setdefault("min_seq_len", 1)
    return prepare_domain(ratings, movies, out, progress=False, **kw), out


def test_movielens_shaped_files_become_a_domain(tmp_path, movies):
    rows = [(10, 3, 5, 300), (10, 1, 4, 100), (10, 2, 3, 200), (20, 4, 5, 50), (20, 1, 1, 60), (20, 2, 2, 70)]
    report, out = _prepare(tmp_path, rows, movies, min_seq_len=3)
    # Items in metadata order; the never-rated movie 5 leaves the catalogue.
    assert _items(out) == [("1", "Toy Story (1995)"), ("2", "Shawshank Redemption, The (1994)"),
                           ("3", "Heat (1995)"), ("4", 'Sabrina, "the" remake (1995)')]
    assert _users(out) == {"10": ["1", "2", "3"], "20": ["4", "1", "2"]}
    assert (report.rows_read, report.items_read) == (6, 5)
    assert report.dropped["items_never_interacted"] == 1
    assert report.settings["columns"]["user"] == "user_id"  # the default name matched MovieLens' alias
    saved = json.loads((out / REPORT_FILE).read_text())
    assert saved["domains"][0]["users"] == 2 and saved["domains"][0]["interactions"] == 6
    domain = read_domain(out)
    assert domain.num_users == 2 and domain.num_items == 4
    assert "2 users" in report.summary() or "2 users," in report.summary()


def test_ties_keep_file_order_and_duplicates_are_dropped(tmp_path, movies):
    rows = [(1, 3, 5, 7), (1, 1, 5, 7), (1, 2, 5, 5), (1, 1, 4, 7), (1, 4, 5, 7), (1, 2, 5, 5), (1, 2, 5, 9)]
    report, out = _prepare(tmp_path, rows, movies)
    # time 5: item 2 (its exact duplicate dropped); time 7: 3, 1, 4 in file order (the second (1,1,7) dropped).
    assert _users(out) == {"1": ["2", "3", "1", "4", "2"]}
    assert report.dropped["duplicate_interactions"] == 2


def test_iso_dates_datetimes_and_millisecond_epochs(tmp_path, movies):
    # A retail log's dates, datetimes with and without zones (naive = UTC), and epochs in ms mixed with them.
    rows = [(1, 3, 5, "2018-09-21"), (1, 1, 5, "2018-09-20T23:30:00-02:00"), (1, 2, 5, "2018-09-20"),
            (2, 4, 5, "2018-09-20T10:00:00Z"), (2, 1, 5, 1537437600000), (2, 2, 5, "2018-09-20T11:00:00")]
    # user 1: 09-20 00:00 (2), 09-21 00:00 (3), 09-21 01:30 UTC (1); user 2: 1537437600000 ms = 09-20 10:00 UTC
    # ties with item 4 and keeps file order after it, then 11:00 (2).
    report, out = _prepare(tmp_path, rows, movies)
    assert _users(out) == {"1": ["2", "3", "1"], "2": ["4", "1", "2"]}
    assert report.settings["columns"]["time_format"] == "iso-8601 + numeric (ms)"
    only_dates = [(1, 2, 5, "2018-09-21"), (1, 1, 5, "2018-09-20")]
    report, out = _prepare(tmp_path, only_dates, movies, out=tmp_path / "dates")
    assert _users(out) == {"1": ["1", "2"]} and report.settings["columns"]["time_format"] == "iso-8601"
    ms = [(1, 2, 5, 1537437600001), (1, 1, 5, 1537437600000)]
    report, out = _prepare(tmp_path, ms, movies, out=tmp_path / "ms")
    assert _users(out) == {"1": ["1", "2"]} and report.settings["columns"]["time_format"] == "numeric (ms)"


def test_time_unit_given_for_a_mixed_column(tmp_path, movies):
    from pmmrec.data.tables import PrepareColumns

    # 1537437600 is 2018-09-20 10:00 UTC in seconds, but 1970-01-18 19:03 in milliseconds: the unit decides
    # whether it comes before or after 1970-01-19.
    rows = [(1, 1, 5, "1970-01-19"), (1, 2, 5, 1537437600)]
    _, out = _prepare(tmp_path, rows, movies, columns=PrepareColumns(time_unit="s"))
    assert _users(out) == {"1": ["1", "2"]}
    _, out = _prepare(tmp_path, rows, movies, columns=PrepareColumns(time_unit="ms"), out=tmp_path / "ms")
    assert _users(out) == {"1": ["2", "1"]}
    _, out = _prepare(tmp_path, rows, movies, out=tmp_path / "auto")  # auto: below 1e11, so seconds
    assert _users(out) == {"1": ["1", "2"]}


def test_unknown_items_are_dropped_and_named(tmp_path, movies):
    rows = [(1, 1, 5, 1), (1, 99, 5, 2), (1, 2, 5, 3), (2, 99, 1, 1), (2, 77, 1, 2)]
    report, out = _prepare(tmp_path, rows, movies)
    assert report.dropped["unknown_item_interactions"] == 3
    assert report.dropped["unknown_items"] == 2
    assert report.unknown_item_examples == ["line 3: '99'", "line 6: '77'"]
    assert _users(out) == {"1": ["1", "2"]}


def test_kcore_is_iterative(tmp_path, movies):
    # 2-core by hand: item 4 has one interaction -> dropped; then user c has one left -> dropped;
    # then item 3 has one left -> dropped; users a and b with items 1 and 2 remain.
    rows = [("a", 1, 0, 1), ("a", 2, 0, 2), ("b", 1, 0, 1), ("b", 2, 0, 2), ("b", 3, 0, 3),
            ("c", 3, 0, 1), ("c", 4, 0, 2)]
    report, out = _prepare(tmp_path, rows, movies, kcore=2)
    assert _users(out) == {"a": ["1", "2"], "b": ["1", "2"]}
    assert [i for i, _ in _items(out)] == ["1", "2"]
    dropped = report.domains[0].dropped
    assert (dropped["kcore_users"], dropped["kcore_items"], dropped["kcore_interactions"]) == (1, 2, 3)


def test_short_users_are_dropped_and_counted(tmp_path, movies):
    rows = [(1, 1, 0, 1), (1, 2, 0, 2), (1, 3, 0, 3), (2, 4, 0, 1), (2, 1, 0, 2)]
    report, out = _prepare(tmp_path, rows, movies, min_seq_len=3)
    assert list(_users(out)) == ["1"]
    d = report.domains[0].dropped
    assert (d["short_users"], d["short_user_interactions"], d["short_user_items"]) == (1, 2, 1)


def test_kcore_and_min_seq_len_hold_together(tmp_path, movies):
    # min_seq_len 3 removes user z, which leaves item 4 below k=2; the loop must notice.
    rows = [("x", 1, 0, 1), ("x", 2, 0, 2), ("x", 4, 0, 3), ("y", 1, 0, 1), ("y", 2, 0, 2), ("y", 3, 0, 3),
            ("w", 1, 0, 1), ("w", 2, 0, 2), ("w", 3, 0, 3), ("z", 4, 0, 1), ("z", 3, 0, 2)]
    _, out = _prepare(tmp_path, rows, movies, kcore=2, min_seq_len=3)
    users = _users(out)
    assert users == {"y": ["1", "2", "3"], "w": ["1", "2", "3"]}  # x fell to 2 items once item 4 left


def test_tsv_with_explicit_columns_and_no_time_column(tmp_path):
    log = _write(tmp_path / "log.tsv", "who\twhat\nu1\tb\nu1\ta\nu2\ta\n")
    meta = _write(tmp_path / "meta.tsv", 'id\tname\na\t"Quoted" start\nb\tB title\n')
    cols = PrepareColumns(user="who", item="what", meta_item="id", time=None, title="name")
    prepare_domain(log, meta, tmp_path / "out", columns=cols, min_seq_len=1, progress=False)
    assert _users(tmp_path / "out") == {"u1": ["b", "a"], "u2": ["a"]}  # file order is the time order
    assert _items(tmp_path / "out") == [("a", '"Quoted" start'), ("b", "B title")]  # TSV has no quoting


def test_parquet_and_gzip_inputs(tmp_path, movies):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user": [1, 1, 2], "item": [2, 1, 1], "timestamp": [5, 3, 1]}),
                   tmp_path / "log.parquet")
    prepare_domain(tmp_path / "log.parquet", movies, tmp_path / "a", min_seq_len=1, progress=False)
    assert _users(tmp_path / "a") == {"1": ["1", "2"], "2": ["1"]}
    with gzip.open(tmp_path / "log.csv.gz", "wt", encoding="utf-8") as f:
        f.write(_ratings([(1, 2, 0, 5), (1, 1, 0, 3)]))
    prepare_domain(tmp_path / "log.csv.gz", movies, tmp_path / "b", min_seq_len=1, progress=False)
    assert _users(tmp_path / "b") == {"1": ["1", "2"]}


def test_parquet_null_timestamp_is_named(tmp_path, movies):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"user": [1, 1], "item": [2, 1], "timestamp": [5, None]}), tmp_path / "log.parquet")
    with pytest.raises(DataError, match="empty timestamp") as e:
        prepare_domain(tmp_path / "log.parquet", movies, tmp_path / "out", progress=False)
    assert e.value.line == 2


# ---- bad inputs: each error names the file, the line and the column --------------------------------------------


@pytest.mark.parametrize(("body", "line", "column", "match"), [
    ("1,1,5,100\n1,2,5,\n", 3, "timestamp", "empty timestamp"),
    ("1,1,5,100\n1,2,5,yesterday\n", 3, "timestamp", "neither a number .* nor an ISO-8601 date"),
    ("1,1,5,2018-09-20\n1,2,5,2018-13-01\n", 3, "timestamp", "neither a number"),
    ("1,1,5,100\n1,2,5,nan\n", 3, "timestamp", "not finite"),
    ("1,1,5,100\n1,2,100\n", 3, None, "expected 4 fields"),
    ("1,1,5,100\nbad user,2,5,100\n", 3, "user_id", "whitespace"),
    ("1,1,5,100\n,2,5,100\n", 3, "user_id", "empty id"),
    ("1,1,5,100\n1, ,5,100\n", 3, "movie_id", "empty item id"),
])
def test_bad_interaction_rows(tmp_path, movies, body, line, column, match):
    ratings = _write(tmp_path / "r.csv", "user_id,movie_id,rating,timestamp\n" + body)
    with pytest.raises(DataError, match=match) as e:
        prepare_domain(ratings, movies, tmp_path / "out", progress=False)
    assert (e.value.path, e.value.line, e.value.field) == (ratings, line, column)
    assert str(ratings) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_column_lists_the_columns_found(tmp_path, movies):
    ratings = _write(tmp_path / "r.csv", "user_id,movie_id,rating\n1,1,5\n")
    with pytest.raises(DataError, match=r"missing column 'timestamp'.*\['user_id', 'movie_id', 'rating'\]") as e:
        prepare_domain(ratings, movies, tmp_path / "out", progress=False)
    assert e.value.line == 1
    meta = _write(tmp_path / "m.csv", "movie_id,name_of_film\n1,x\n")
    with pytest.raises(DataError, match="missing column 'title'"):
        prepare_domain(ratings, meta, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="missing column 'genre'"):
        prepare_domain(ratings, movies, tmp_path / "out", split_by="genre", groups={"a": ["Drama"]})
    with pytest.raises(DataError, match="missing column 'pic'"):  # a named (non-default) column is required
        prepare_domain(ratings, movies, tmp_path / "out", columns=PrepareColumns(image="pic"))


def test_invalid_utf8_names_the_line(tmp_path, movies):
    ratings = _write(tmp_path / "r.csv", b"user_id,movie_id,rating,timestamp\n1,1,5,1\n1,2,5,\xff2\n")
    with pytest.raises(DataError, match="invalid UTF-8") as e:
        prepare_domain(ratings, movies, tmp_path / "out", progress=False)
    assert (e.value.path, e.value.line) == (ratings, 3)
    good = _write(tmp_path / "g.csv", _ratings([(1, 1, 5, 1)]))
    meta = _write(tmp_path / "m.csv", MOVIES.encode() + b"6,Caf\xe9 (1990),Drama\n")
    with pytest.raises(DataError, match="invalid UTF-8") as e:
        prepare_domain(good, meta, tmp_path / "out", progress=False)
    assert (e.value.path, e.value.line) == (meta, 7)


def test_bad_metadata(tmp_path):
    ratings = _write(tmp_path / "r.csv", _ratings([(1, 1, 5, 1), (1, 2, 5, 2)]))
    dup = _write(tmp_path / "dup.csv", "item,title\n1,A\n2,B\n1,C\n")
    with pytest.raises(DataError, match=r"duplicate item id '1' \(first on line 2\)") as e:
        prepare_domain(ratings, dup, tmp_path / "out")
    assert (e.value.line, e.value.field) == (4, "item")
    spaced = _write(tmp_path / "sp.csv", "item,title\n1,A\nx y,B\n")
    with pytest.raises(DataError, match="whitespace") as e:
        prepare_domain(ratings, spaced, tmp_path / "out")
    assert e.value.line == 3
    with pytest.raises(DataError, match="empty file"):
        prepare_domain(ratings, _write(tmp_path / "empty.csv", ""), tmp_path / "out")
    with pytest.raises(DataError, match="no items"):
        prepare_domain(ratings, _write(tmp_path / "h.csv", "item,title\n"), tmp_path / "out")
    with pytest.raises(DataError, match="file not found"):
        prepare_domain(ratings, tmp_path / "nope.csv", tmp_path / "out")
    quote = _write(tmp_path / "q.csv", 'item,title\n1,A\n2,"unterminated\n3,C\n')
    with pytest.raises(DataError, match="malformed CSV: unexpected end of data") as e:
        prepare_domain(ratings, quote, tmp_path / "out")
    assert e.value.line == 3  # where the quoted field began
    quote = _write(tmp_path / "q.csv", 'item,title\n1,A\n2,"B"x\n')
    with pytest.raises(DataError, match="malformed CSV") as e:
        prepare_domain(ratings, quote, tmp_path / "out")
    assert e.value.line == 3
    assert not (tmp_path / "out").exists()


def test_empty_titles(tmp_path):
    ratings = _write(tmp_path / "r.csv", _ratings([(1, 1, 5, 1), (1, 2, 5, 2), (1, 3, 5, 3)]))
    meta = _write(tmp_path / "m.csv", "item,title\n1,A\n2,  \n3,C\n4,\n")
    with pytest.raises(DataError, match="empty title for item '2'") as e:
        prepare_domain(ratings, meta, tmp_path / "out", min_seq_len=1)
    assert (e.value.line, e.value.field) == (3, "title")  # item 4 is never rated: not an error
    prepare_domain(ratings, meta, tmp_path / "blank", min_seq_len=1, empty_title="blank")
    assert _items(tmp_path / "blank") == [("1", "A"), ("2", ""), ("3", "C")]
    assert read_domain(tmp_path / "blank", empty_title="blank").titles[1] == ""
    report = prepare_domain(ratings, meta, tmp_path / "drop", min_seq_len=1, empty_title="drop")
    assert _users(tmp_path / "drop") == {"1": ["1", "3"]}
    assert report.dropped["empty_title_items"] == 1 and report.dropped["empty_title_interactions"] == 1


def test_quoted_commas_and_newlines_in_titles(tmp_path):
    meta = _write(tmp_path / "m.csv", 'item,title\n1,"Good, Bad and Ugly"\n2,"two\nlines"\n3,plain\n')
    ratings = _write(tmp_path / "r.csv", _ratings([(1, 3, 0, 1), (1, 1, 0, 2), (1, 2, 0, 3)]))
    prepare_domain(ratings, meta, tmp_path / "out", min_seq_len=1)
    assert _items(tmp_path / "out") == [("1", "Good, Bad and Ugly"), ("2", "two lines"), ("3", "plain")]
    # Line numbers after a record spanning two lines still match the file.
    bad = _write(tmp_path / "b.csv", 'item,title\n1,"two\nlines"\nx y,z\n')
    with pytest.raises(DataError, match="whitespace") as e:
        prepare_domain(ratings, bad, tmp_path / "out2")
    assert e.value.line == 4


def test_separator_sniffed_or_given(tmp_path):
    meta = _write(tmp_path / "m.csv", "item;title\n1;A, with comma\n2;B\n")
    ratings = _write(tmp_path / "r.txt", "user|item|timestamp\nu|1|1\nu|2|2\n")
    prepare_domain(ratings, meta, tmp_path / "out", min_seq_len=1)
    assert _items(tmp_path / "out") == [("1", "A, with comma"), ("2", "B")]
    with pytest.raises(DataError, match="missing column"):
        prepare_domain(ratings, meta, tmp_path / "x", columns=PrepareColumns(sep=","))


# ---- atomic output ---------------------------------------------------------------------------------------------


def test_a_late_bad_line_leaves_nothing(tmp_path, movies):
    rows = [(u, 1 + u % 4, 5, u) for u in range(2000)]
    text = _ratings(rows) + "7,2,5,oops\n"
    ratings = _write(tmp_path / "in" / "r.csv", text)
    with pytest.raises(DataError) as e:
        prepare_domain(ratings, movies, tmp_path / "work" / "out")
    assert e.value.line == 2002
    assert not (tmp_path / "work").exists() or list((tmp_path / "work").iterdir()) == []


def test_a_failure_while_writing_leaves_nothing(tmp_path, movies, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "write_domain_tables", broken)
    (tmp_path / "work").mkdir()
    with pytest.raises(OSError, match="disk full"):
        _prepare(tmp_path, [(1, 1, 0, 1)], movies, out=tmp_path / "work" / "out")
    assert list((tmp_path / "work").iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path, movies):
    _, out = _prepare(tmp_path, [(1, 1, 0, 1)], movies)
    with pytest.raises(PmmrecError, match="already exists"):
        _prepare(tmp_path, [(1, 2, 0, 1)], movies)
    assert _users(out) == {"1": ["1"]}
    _prepare(tmp_path, [(1, 2, 0, 1)], movies, overwrite=True)
    assert _users(out) == {"1": ["2"]}
    assert sorted(p.name for p in out.parent.iterdir()) == ["in", "out"]


def test_output_holding_an_input_is_refused(tmp_path, movies):
    with pytest.raises(PmmrecError, match="contains the input"):
        _prepare(tmp_path, [(1, 1, 0, 1)], movies, out=tmp_path / "in", overwrite=True)
    assert movies.is_file()


def test_bad_arguments(tmp_path, movies):
    for kw, match in [({"split_by": "genres"}, "go together"), ({"groups": {"a": ["x"]}}, "go together"),
                      ({"split_by": "genres", "groups": {"../a": ["Drama"]}}, "folder name"),
                      ({"split_by": "genres", "groups": {"a": []}}, "non-empty"),
                      ({"kcore": -1}, ">= 0"), ({"empty_title": "skip"}, "empty_title"),
                      ({"image_dir": tmp_path / "none"}, "image folder not found")]:
        with pytest.raises(PmmrecError, match=match):
            _prepare(tmp_path, [(1, 1, 0, 1)], movies, **kw)


# ---- split by genre --------------------------------------------------------------------------------------------


def test_genre_split_is_disjoint_and_first_group_wins(tmp_path, movies):
    rows = [(1, 1, 0, 1), (1, 2, 0, 2), (1, 3, 0, 3), (1, 4, 0, 4), (2, 4, 0, 1), (2, 1, 0, 2), (2, 3, 0, 3)]
    groups = {"kids": ["Children's", "Animation"], "comedy": ["Comedy"], "rest": ["Drama", "Action"]}
    report, out = _prepare(tmp_path, rows, movies, split_by="genres", groups=groups)
    # Toy Story is Comedy too, but "kids" comes first and claims it.
    assert [i for i, _ in _items(out / "kids")] == ["1"]
    assert [i for i, _ in _items(out / "comedy")] == ["4"]
    assert [i for i, _ in _items(out / "rest")] == ["2", "3"]
    assert _users(out / "rest") == {"1": ["2", "3"], "2": ["3"]}
    assert _users(out / "comedy") == {"1": ["4"], "2": ["4"]}
    assert [d.name for d in report.domains] == ["kids", "comedy", "rest"]
    assert (out / REPORT_FILE).is_file() and not (out / "items.tsv").exists()
    read_domain(out / "kids")


def test_genre_split_drops_unmatched_items_and_refuses_empty_groups(tmp_path, movies):
    rows = [(1, 1, 0, 1), (1, 3, 0, 2), (1, 2, 0, 3)]
    report, out = _prepare(tmp_path, rows, movies, split_by="genres", groups={"drama": ["Drama"]})
    assert report.dropped["no_group_items"] == 2 and report.dropped["no_group_interactions"] == 2
    assert _users(out / "drama") == {"1": ["2"]}
    with pytest.raises(PmmrecError, match="'horror' has no interactions"):
        _prepare(tmp_path, rows, movies, split_by="genres", groups={"drama": ["Drama"], "horror": ["Horror"]},
                 out=tmp_path / "o2")
    assert not (tmp_path / "o2").exists()


def _expected_sequences(data, claimed: set[str], min_seq_len: int) -> dict[str, list[str]]:
    """The slow, obvious version: first occurrence of each (user, item, time), stable time sort, restrict."""
    first = list(dict.fromkeys((f"u{u}", f"i{i}", t) for u, i, t in data))
    users = list(dict.fromkeys(u for u, _, _ in first))
    out = {}
    for user in users:
        rows = sorted(((t, i) for u, i, t in first if u == user), key=lambda r: r[0])
        items = [i for _, i in rows if i in claimed]
        if items and len(items) >= min_seq_len:
            out[user] = items
    return out


@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 11), st.integers(0, 5)), min_size=1, max_size=80),
       genres=st.lists(st.sets(st.sampled_from("ABCDEF"), min_size=1, max_size=3), min_size=12, max_size=12),
       min_seq_len=st.integers(0, 3))
def test_split_property_domains_are_disjoint_restrictions(data, genres, min_seq_len):
    """Item sets are disjoint, each item sits in its first matching group, sequences are restrictions."""
    groups = {"target": ["A"], "s1": ["B", "C"], "s2": ["D", "E"]}  # F: an item of no group
    # Mostly non-empty domains: items 0, 1, 2 belong to one group each and user 0 rates each three times.
    genres = [{"A"}, {"B"}, {"D"}] + genres[3:]
    data = [(0, i, t) for i in range(3) for t in range(3)] + data
    owner = {}
    for k, g in enumerate(genres):
        hits = [name for name, values in groups.items() if set(g) & set(values)]
        if hits:
            owner[f"i{k}"] = hits[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        meta = _write(tmp / "m.csv", "item,title,genres\n" + "".join(
            f"i{k},title {k},{'|'.join(sorted(g))}\n" for k, g in enumerate(genres)))
        ratings = _write(tmp / "r.csv", "user,item,timestamp\n" + "".join(f"u{u},i{i},{t}\n" for u, i, t in data))
        expected = {name: _expected_sequences(data, {i for i, n in owner.items() if n == name}, min_seq_len)
                    for name in groups}
        event("some domain empty: refused" if not all(expected.values()) else "domains written")
        if not all(expected.values()):
            with pytest.raises(PmmrecError, match="no interactions"):
                prepare_domain(ratings, meta, tmp / "out", split_by="genres", groups=groups,
                               min_seq_len=min_seq_len, progress=False)
            assert not (tmp / "out").exists()
            return
        prepare_domain(ratings, meta, tmp / "out", split_by="genres", groups=groups, min_seq_len=min_seq_len,
                       progress=False)
        seen: dict[str, str] = {}
        for name in groups:
            for item, _ in _items(tmp / "out" / name):
                assert item not in seen, f"{item} in both {seen.get(item)} and {name}"
                assert owner[item] == name
                seen[item] = name
            assert _users(tmp / "out" / name) == expected[name]
        target_items = {i for i, n in seen.items() if n == "target"}
        for name in ("s1", "s2"):
            assert not target_items & {i for seq in _users(tmp / "out" / name).values() for i in seq}


# ---- images ----------------------------------------------------------------------------------------------------


def test_images_are_stored_and_missing_or_bad_ones_reported(tmp_path, movies):
    posters = tmp_path / "posters"
    _write(posters / "1.png", _image((255, 0, 0)))
    _write(posters / "2.jpg", _image((0, 255, 0), fmt="JPEG"))
    _write(posters / "3.jpg", b"not an image at all")
    _write(posters / "99.png", _image((0, 0, 255)))  # no such item: ignored
    rows = [(1, 1, 0, 1), (1, 2, 0, 2), (1, 3, 0, 3), (1, 4, 0, 4)]
    report, out = _prepare(tmp_path, rows, movies, image_dir=posters, workers=1)
    d = report.domains[0]
    assert d.images_stored == 2
    assert d.missing_images == ["3", "4"]
    assert [Path(p).name for p, _ in d.bad_images] == ["3.jpg"]
    with pytest.raises(DataError, match="2 of 4 items have no image"):
        read_domain(out, missing_image="error")
    assert read_domain(out, missing_image="blank").image_db == out / "images.lmdb"
    assert "2 stored, 2 missing" in report.summary()


def test_image_column_names_the_files(tmp_path):
    pics = tmp_path / "pics"
    _write(pics / "sub" / "apple.png", _image((1, 2, 3)))
    _write(pics / "pear.png", _image((3, 2, 1)))
    meta = _write(tmp_path / "m.csv", "item,title,image_path\na,Apple,sub/apple.png\nb,Pear,pear.png\nc,C,\n")
    ratings = _write(tmp_path / "r.csv", "user,item,timestamp\nu,a,1\nu,b,2\nu,c,3\n")
    report = prepare_domain(ratings, meta, tmp_path / "out", image_dir=pics, min_seq_len=1, workers=1,
                            progress=False)
    from pmmrec.data.image_db import image_keys

    assert image_keys(tmp_path / "out" / "images.lmdb") == {"a", "b"}
    assert report.domains[0].missing_images == ["c"]


def test_a_split_domain_without_any_image_is_reported_not_fatal(tmp_path, movies):
    posters = tmp_path / "posters"
    _write(posters / "1.png", _image((255, 0, 0)))
    rows = [(1, 1, 0, 1), (1, 2, 0, 2)]
    report, out = _prepare(tmp_path, rows, movies, image_dir=posters, workers=1, split_by="genres",
                           groups={"kids": ["Animation"], "drama": ["Drama"]})
    assert report.domains[0].images_stored == 1 and report.domains[1].images_stored == 0
    assert report.domains[1].missing_images == ["2"]
    assert not (out / "drama" / "images.lmdb").exists()


# ---- MovieLens-1M (developers' machines only) ------------------------------------------------------------------

SHARED_MOVIELENS = Path(__file__).resolve().parents[3].parent / "shared" / "datasets" / "movielens-1m"
GENRE_GROUPS = {  # the held-out target first, so it claims every item it touches
    "children": ["Animation", "Children's"],
    "action": ["Action", "Adventure", "Thriller"],
    "comedy": ["Comedy", "Romance"],
    "drama": ["Drama", "Crime", "War"],
}


@pytest.fixture(scope="module")
def movielens_domain(tmp_path_factory):
    ml = SHARED_MOVIELENS
    if not (ml / "ratings.csv").is_file():
        pytest.skip(f"shared dataset absent: {ml} (only the developers' machines have it)")
    out = tmp_path_factory.mktemp("ml") / "movielens"
    report = prepare_domain(ml / "ratings.csv", ml / "movies.csv", out, image_dir=ml / "posters", min_seq_len=0,
                            progress=False)
    return ml, out, report


@pytest.mark.slow
@pytest.mark.shared_data
def test_movielens_imports_whole(movielens_domain):
    from pmmrec.data.stats import domain_stats

    _, out, report = movielens_domain
    d = report.domains[0]
    assert (d.users, d.items, d.interactions) == (6040, 3706, 1_000_209)
    assert report.dropped["duplicate_interactions"] == 0 and report.dropped["unknown_item_interactions"] == 0
    assert sorted(d.missing_images, key=int) == ["1107", "1142", "1421", "1423", "2258", "3027", "3935"]
    assert d.images_stored == 3706 - 7 and d.bad_images == []
    with pytest.raises(DataError, match="7 of 3706 items have no image"):
        read_domain(out, missing_image="error")
    domain = read_domain(out, missing_image="blank")
    stats = domain_stats(domain)
    assert (stats["users"], stats["items"], stats["interactions"]) == (6040, 3706, 1_000_209)
    assert stats["items_without_image"] == 7 and stats["seq_len"]["min"] == 20
    # Sequences are time-ordered: user 1's first rating (978300760) is movie 3186 at 978300019.
    assert domain.item_ids[domain.sequences[0][0] - 1] == "3186"


@pytest.mark.slow
@pytest.mark.shared_data
def test_movielens_genre_split_keeps_target_items_out_of_the_sources(movielens_domain, tmp_path):
    ml, _, _ = movielens_domain
    report = prepare_domain(ml / "ratings.csv", ml / "movies.csv", tmp_path / "genres", split_by="genres",
                            groups=GENRE_GROUPS, image_dir=ml / "posters", progress=False)
    items = {name: set(read_domain(tmp_path / "genres" / name).item_ids) for name in GENRE_GROUPS}
    names = list(items)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not items[names[a]] & items[names[b]], (names[a], names[b])
    target = items["children"]
    for source in names[1:]:
        domain = read_domain(tmp_path / "genres" / source)
        used = {domain.item_ids[i - 1] for seq in domain.sequences for i in seq}
        assert not used & target
    assert all(len(s) >= 3 for n in names for s in read_domain(tmp_path / "genres" / n).sequences)
    assert "Toy Story (1995)" in read_domain(tmp_path / "genres" / "children").titles
    assert sum(d.interactions for d in report.domains) + report.dropped["no_group_interactions"] + sum(
        d.dropped["short_user_interactions"] for d in report.domains) == 1_000_209
    assert np.all([d.items > 100 for d in report.domains])


@settings(max_examples=150, deadline=None)
@given(log=st.binary(max_size=120), meta=st.binary(max_size=120),
       log_text=st.text(alphabet=st.sampled_from('u1,2 "\t\n\r\x00é;|'), max_size=60))
def test_fuzzed_inputs_fail_cleanly(log, meta, log_text):
    """Whatever the bytes, preparing either works or raises a PmmrecError, and never leaves a partial folder."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        good_meta = _write(tmp / "good.csv", "item,title\n1,A\n2,B\n")
        cases = [(b"user,item,timestamp\n" + log, good_meta),
                 (("user,item,timestamp\n" + log_text).encode("utf-8"), good_meta),
                 (b"user,item,timestamp\nu,1,1\nu,2,2\n", _write(tmp / "m.csv", b"item,title\n" + meta))]
        for k, (log_bytes, meta_path) in enumerate(cases):
            ratings = _write(tmp / f"r{k}.csv", log_bytes)
            try:
                prepare_domain(ratings, meta_path, tmp / f"out{k}", min_seq_len=1, progress=False)
            except PmmrecError:
                assert not (tmp / f"out{k}").exists()
        assert not [p for p in tmp.iterdir() if p.name.startswith(".")]
