"""RecBole atomic files in and out: export-atomic -> import-atomic reproduces the split and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from tests.conftest import png_bytes

from pmmrec.cli import main
from pmmrec.data.atomic import import_atomic, read_header
from pmmrec.data.atomic_export import export_atomic
from pmmrec.data.datasets import EvalSequences
from pmmrec.data.domain import read_domain, write_domain_tables
from pmmrec.data.image_db import ImageDB, write_image_db
from pmmrec.data.split import leave_one_out
from pmmrec.errors import DataError, PmmrecError
from pmmrec.evaluation.baselines import most_popular

L = 5  # max_seq_len: short, so that long users are cut and histories truncated


@pytest.fixture
def shop(tmp_path) -> Path:
    """40 items (some never used, some only early in long sequences), 30 users of 1..25 interactions, images for
    most items (JPEG and PNG)."""
    rng = np.random.default_rng(3)
    root = tmp_path / "shop"
    root.mkdir()
    item_ids = [f"p{k}" for k in range(40)] + ["odd:id"]
    titles = [f"product {k} {'blue' if k % 2 else 'red'} widget" for k in range(40)] + ["an odd id"]
    popular = rng.permutation(35)[:25]  # items 35..39 never occur
    users, seqs = [], []
    for u in range(30):
        n = int(rng.integers(1, 26))
        seq = [item_ids[int(i)] for i in rng.choice(popular, size=n, p=None)]
        if u == 7:
            seq = ["odd:id"] + seq + ["p1", "p2", "p3"]
        users.append(f"user{u}")
        seqs.append(seq)
    write_domain_tables(root, item_ids, titles, users, seqs)
    images = [(iid, png_bytes((k * 5, 100, 200), fmt="JPEG" if k % 3 else "PNG")) for k, iid in enumerate(item_ids)
              if k % 4 != 1]
    write_image_db(root / "images.lmdb", images)
    return root


def _split(path: Path):
    return leave_one_out(read_domain(path, empty_title="blank"), L, 3)


def _metrics(split) -> dict:
    valid_full = [np.concatenate([tr, va[-1:]]) for tr, va in zip(split.train, split.valid, strict=True)]
    test_full = [np.concatenate([v, te[-1:]]) for v, te in zip(valid_full, split.test, strict=True)]
    return {name: most_popular(split.train_counts, EvalSequences.from_sequences(seqs, L), [5, 10])
            for name, seqs in (("valid", valid_full), ("test", test_full))}


def test_round_trip_reproduces_the_split_and_the_metrics(shop, tmp_path):
    report = export_atomic(shop, tmp_path / "shop-recbole", max_seq_len=L, images=True)
    original = _split(shop)
    assert report.users == original.num_users and report.dropped_users > 0
    assert report.rows["valid"] == report.rows["test"] == original.num_users
    assert report.rows["train"] == sum(len(t) - 1 for t in original.train)

    imported = import_atomic(tmp_path / "shop-recbole", tmp_path / "shop2", progress=False)
    assert imported.layout == "benchmark" and imported.changed_since_export == []
    again = _split(tmp_path / "shop2")
    assert again.item_ids == original.item_ids and again.titles == original.titles
    assert again.user_ids == original.user_ids
    for part in ("train", "valid", "test"):
        for a, b in zip(getattr(again, part), getattr(original, part), strict=True):
            assert np.array_equal(a, b), part
    assert np.array_equal(again.train_counts, original.train_counts)
    assert _metrics(again) == _metrics(original)
    assert _metrics(original)["test"]["exclude_history"]["HR@10"] > 0  # the comparison is not between zeros

    # Images come back byte for byte (through the image files the export wrote).
    before, after = ImageDB(shop / "images.lmdb"), ImageDB(tmp_path / "shop2" / "images.lmdb")
    try:
        assert after.keys() == before.keys() & set(original.item_ids)
        assert all(after.get(k) == before.get(k) for k in after)
    finally:
        before.close()
        after.close()


def test_exported_files_are_recbole_benchmark_files(shop, tmp_path):
    out = tmp_path / "recbole" / "shop"
    export_atomic(shop, out, max_seq_len=L)
    assert read_header(out / "shop.train.inter") == [("user_id", "token"), ("item_id_list", "token_seq"),
                                                     ("item_id", "token")]
    original = _split(shop)
    lines = (out / "shop.test.inter").read_text().splitlines()[1:]
    user, history, target = lines[0].split("\t")
    assert user == original.user_ids[0] and target == original.item_ids[original.test[0][-1] - 1]
    assert len(history.split()) <= L
    assert max(len(line.split("\t")[1].split()) for line in (out / "shop.train.inter").read_text().splitlines()[1:]) \
        == L
    config = yaml.safe_load((out / "shop.yaml").read_text())
    assert config["benchmark_filename"] == ["train", "valid", "test"] and config["MAX_ITEM_LIST_LENGTH"] == L
    manifest = json.loads((out / "shop.split.json").read_text())
    assert manifest["split"]["max_seq_len"] == L and set(manifest["files"]) == {
        "shop.train.inter", "shop.valid.inter", "shop.test.inter", "shop.item"}
    assert (out / "shop.item").read_text().splitlines()[0] == "item_id:token\ttitle:token_seq"


def test_import_interaction_files_sorts_by_time_and_reads_images(tmp_path):
    src = tmp_path / "ml"
    (src / "posters").mkdir(parents=True)
    (src / "ml.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "u1\ti3\t4\t30\nu1\ti1\t5\t10\nu1\ti2\t3\t20\nu2\ti2\t1\t5\nu2\ti3\t2\t6\nu2\ti1\t2\t7\nu3\ti1\t3\t1\n",
        "utf-8")
    (src / "ml.item").write_text("item_id:token\tgenre:token_seq\ttitle:token_seq\tposter:token\n"
                                 "i1\tdrama\tThe First\tposters/a.png\ni2\tcomedy\tSecond One\tposters/b.png\n"
                                 "i3\tdrama\tThird\t\n", "utf-8")
    (src / "posters" / "a.png").write_bytes(png_bytes((1, 2, 3)))
    (src / "posters" / "b.png").write_bytes(png_bytes((4, 5, 6)))
    report = import_atomic(src, tmp_path / "out", progress=False)
    assert report.layout == "interactions" and report.users == 2  # u3 is too short
    domain = read_domain(tmp_path / "out", missing_image="blank")
    index = {iid: k + 1 for k, iid in enumerate(domain.item_ids)}
    assert [list(s) for s in domain.sequences] == [[index["i1"], index["i2"], index["i3"]],
                                                   [index["i2"], index["i3"], index["i1"]]]
    assert domain.titles[domain.item_ids.index("i2")] == "Second One"
    db = ImageDB(domain.image_db)
    try:
        assert db.keys() == {"i1", "i2"}
    finally:
        db.close()


def _benchmark(root: Path, train: str, valid: str, test: str, items: str = "a\tA\nb\tB\nc\tC\nd\tD\n") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    for split, body in (("train", train), ("valid", valid), ("test", test)):
        (root / f"x.{split}.inter").write_text(header + body, "utf-8")
    (root / "x.item").write_text("item_id:token\ttitle:token_seq\n" + items, "utf-8")
    return root


def test_benchmark_files_from_elsewhere_rebuild_each_sequence(tmp_path):
    # u has training rows; v is too short to have any (its validation history is its whole training part)
    src = _benchmark(tmp_path / "x", "u\ta\tb\nu\ta b\tc\n", "u\ta b c\td\nv\tc\td\n", "u\tb c d\ta\nv\tc d\tb\n")
    import_atomic(src, tmp_path / "out", progress=False)
    domain = read_domain(tmp_path / "out")
    assert domain.user_ids == ["u", "v"]
    assert [[domain.item_ids[i - 1] for i in s] for s in domain.sequences] == [["a", "b", "c", "d", "a"],
                                                                               ["c", "d", "b"]]


@pytest.mark.parametrize("train, valid, test, match", [
    ("u\ta\tb\nu\tc\tc\n", "u\ta b c\td\n", "u\td\ta\n", r"x\.train\.inter:3, field 'item_id_list'.*does not "
                                                         "continue"),
    ("u\ta\tb\n", "u\tb c\td\n", "u\td\ta\n", r"x\.valid\.inter:2.*does not continue"),
    ("u\ta\tb\n", "u\ta b\tc\n", "", r"x\.valid\.inter:2.*has a valid row but no test row"),
    ("u\ta\tb\n", "u\ta b\tc\nu\ta b\tc\n", "u\ta b c\td\n", r"x\.valid\.inter:3.*second row"),
    ("u\ta\tz\n", "u\ta z\tc\n", "u\tc\td\n", r"x\.train\.inter:2, field 'item_id'.*'z' is not in the item file"),
    ("w\ta\tb\n", "u\ta\tc\n", "u\tc\td\n", r"x\.train\.inter:2.*'w' has training rows but no test row"),
])
def test_bad_benchmark_files_name_the_line(tmp_path, train, valid, test, match):
    src = _benchmark(tmp_path / "x", train, valid, test)
    with pytest.raises(DataError, match=match):
        import_atomic(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_headers_and_missing_files(tmp_path):
    src = tmp_path / "y"
    src.mkdir()
    (src / "y.inter").write_text("user_id\titem_id:token\n", "utf-8")
    (src / "y.item").write_text("item_id:token\ttitle:token_seq\na\tA\n", "utf-8")
    with pytest.raises(DataError, match=r"y\.inter:1, field 'user_id'.*has no type"):
        import_atomic(src, tmp_path / "out", progress=False)
    (src / "y.inter").write_text("user_id:text\titem_id:token\n", "utf-8")
    with pytest.raises(DataError, match="unknown type 'text'"):
        import_atomic(src, tmp_path / "out", progress=False)
    (src / "y.item").write_text("item_id:token\tname:token_seq\na\tA\n", "utf-8")
    (src / "y.inter").write_text("user_id:token\titem_id:token\n", "utf-8")
    with pytest.raises(DataError, match=r"no title column 'title'; the columns are \['item_id', 'name'\]"):
        import_atomic(src, tmp_path / "out", progress=False)
    (src / "y.item").unlink()
    with pytest.raises(DataError, match="needs item titles"):
        import_atomic(src, tmp_path / "out", progress=False)
    with pytest.raises(PmmrecError, match="expected one RecBole dataset"):
        import_atomic(tmp_path, tmp_path / "out", progress=False)


def test_export_refuses_whitespace_in_user_ids(tmp_path):
    write_domain_tables(tmp_path / "d", ["a", "b", "c"], ["A", "B", "C"], ["user one"], [["a", "b", "c"]])
    with pytest.raises(DataError, match="contains whitespace"):
        export_atomic(tmp_path / "d", tmp_path / "out")


@pytest.mark.parametrize(("items", "users", "match"), [
    (["a", "NA", "c"], ["u1"], "item id 'NA' would not survive RecBole's reader"),
    (["a", "b", "c"], ["null"], "user id 'null' would not survive"),
    (["a", '"b', "c"], ["u1"], "item id '\"b' would not survive"),
])
def test_export_refuses_ids_pandas_would_mangle(tmp_path, items, users, match):
    write_domain_tables(tmp_path / "d", items, ["A", "B", "C"], users, [items])
    with pytest.raises(DataError, match=match):
        export_atomic(tmp_path / "d", tmp_path / "out")


def test_export_keeps_titles_readable_and_the_whole_catalogue(tmp_path):
    # A title opening with a double quote would break pandas' reader; item "d" is seen by nobody kept.
    write_domain_tables(tmp_path / "d", ["a", "b", "c", "d"], ['"Great Performances" Cats (1998)', "B", "C", "D"],
                        ["u1", "u2"], [["a", "b", "c"], ["d"]])
    export_atomic(tmp_path / "d", tmp_path / "out", name="d")
    lines = (tmp_path / "out" / "d.item").read_text().splitlines()
    assert lines[1] == "a\t'Great Performances' Cats (1998)" and len(lines) == 5  # header + a, b, c, d
    config = yaml.safe_load((tmp_path / "out" / "d.yaml").read_text())
    assert config["load_col"]["item"] == ["item_id"]  # RecBole ranks d too, as pmmrec does
    assert json.loads((tmp_path / "out" / "d.split.json").read_text())["split"]["history"] == "all"


def test_edited_exports_are_reported(shop, tmp_path):
    export_atomic(shop, tmp_path / "e", max_seq_len=L)
    path = tmp_path / "e" / "e.test.inter"
    path.write_text(path.read_text() + "\n", "utf-8")  # still valid, but not what was exported
    report = import_atomic(tmp_path / "e", tmp_path / "out", progress=False)
    assert report.changed_since_export == ["e.test.inter"]


def test_cli_round_trip(shop, tmp_path, capsys):
    assert main(["data", "export-atomic", str(shop), "--out", str(tmp_path / "rb"), "--max-seq-len", "5"]) == 0
    assert "RecBole benchmark files rb.{train,valid,test}.inter" in capsys.readouterr().out
    assert main(["data", "import-atomic", str(tmp_path / "rb"), "--out", str(tmp_path / "back")]) == 0
    assert "imported RecBole benchmark files" in capsys.readouterr().out
    assert _split(tmp_path / "back").item_ids == _split(shop).item_ids


def test_refuses_to_write_over_its_input(shop, tmp_path):
    export_atomic(shop, tmp_path / "rb", max_seq_len=L)
    with pytest.raises(PmmrecError, match="contains the input folder"):
        import_atomic(tmp_path / "rb", tmp_path / "rb", overwrite=True, progress=False)
    with pytest.raises(PmmrecError, match="contains the domain"):
        export_atomic(shop, tmp_path, overwrite=True)
    assert (tmp_path / "rb" / "rb.test.inter").is_file() and (shop / "users.tsv").is_file()
