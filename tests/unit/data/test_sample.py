"""``sample_domain`` (``pmmrec data sample``): random users with whole histories, their items and images."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tests.conftest import png_bytes

from pmmrec.cli import main
from pmmrec.data import sample as sample_module
from pmmrec.data.domain import read_domain, write_domain_tables
from pmmrec.data.image_db import ImageDB, image_keys, write_image_db
from pmmrec.data.sample import REPORT_FILE, sample_domain
from pmmrec.errors import PmmrecError


def _images(path: Path) -> dict[str, bytes]:
    db = ImageDB(path)
    try:
        return {key: db.get(key) for key in db}
    finally:
        db.close()


def _histories(folder: Path) -> dict[str, list[str]]:
    d = read_domain(folder, empty_title="blank")
    return {u: [d.item_ids[i - 1] for i in seq] for u, seq in zip(d.user_ids, d.sequences, strict=True)}


@pytest.fixture
def wide_domain(tmp_path) -> Path:
    """40 users over 30 items (every third without an image) and a prepare_report.json, like a prepared domain."""
    root = tmp_path / "wide"
    root.mkdir()
    rng = random.Random(0)
    ids = [f"m{k}" for k in range(30)]
    users = [[rng.choice(ids) for _ in range(rng.randint(3, 8))] for _ in range(40)]
    write_domain_tables(root, ids, [f"movie number {k}" for k in range(30)], [f"u{k}" for k in range(40)], users)
    write_image_db(root / "images.lmdb", [(iid, png_bytes((8 * k, 255 - 8 * k, 0))) for k, iid in enumerate(ids)
                                          if k % 3])
    (root / "prepare_report.json").write_text("{}\n", encoding="utf-8")
    return root


def test_sample_keeps_whole_histories_their_items_in_order_and_only_their_images(wide_domain, tmp_path):
    out = tmp_path / "s"
    report = sample_domain(wide_domain, out, users=7, seed=3)
    source, sample = read_domain(wide_domain), read_domain(out, empty_title="blank")
    histories = _histories(wide_domain)

    # Users: 7 of the 40, in their source order, each with the whole history unchanged.
    assert len(sample.user_ids) == 7 and len(set(sample.user_ids)) == 7
    positions = [source.user_ids.index(u) for u in sample.user_ids]
    assert positions == sorted(positions)
    assert _histories(out) == {u: histories[u] for u in sample.user_ids}
    # Items: exactly the ones those histories touch, in items.tsv order, with their titles.
    touched = {i for u in sample.user_ids for i in histories[u]}
    assert sample.item_ids == [i for i in source.item_ids if i in touched]
    title = dict(zip(source.item_ids, source.titles, strict=True))
    assert sample.titles == [title[i] for i in sample.item_ids]
    # Images: the kept items' bytes, unchanged; none of the other items'.
    source_images = _images(wide_domain / "images.lmdb")
    assert _images(out / "images.lmdb") == {i: source_images[i] for i in sample.item_ids if i in source_images}
    without = [i for i in sample.item_ids if i not in source_images]
    assert without  # the fixture leaves every third item without an image: some are kept

    assert (report.users, report.users_total, report.seed) == (7, 40, 3)
    assert (report.items, report.items_total) == (len(touched), 30)
    assert report.interactions == sum(len(histories[u]) for u in sample.user_ids) == sample.num_interactions
    assert report.interactions_total == source.num_interactions
    assert report.images_stored == len(sample.item_ids) - len(without)
    assert report.items_without_image == without
    assert report.not_carried == ["prepare_report.json"] and not (out / "prepare_report.json").exists()
    assert json.loads((out / REPORT_FILE).read_text(encoding="utf-8")) == report.to_dict()
    summary = report.summary()
    assert "7 of 40 users (seed 3)" in summary and f"{report.images_stored} copied" in summary


def test_the_same_seed_gives_the_same_sample_and_another_seed_another(wide_domain, tmp_path):
    a, b, c = (tmp_path / name for name in "abc")
    sample_domain(wide_domain, a, users=10, seed=5)
    sample_domain(wide_domain, b, users=10, seed=5)
    sample_domain(wide_domain, c, users=10, seed=6)
    for name in ("users.tsv", "items.tsv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert _images(a / "images.lmdb") == _images(b / "images.lmdb")
    assert read_domain(a).user_ids != read_domain(c).user_ids


def test_every_user_reproduces_the_source_tables(tiny_domain, tmp_path):
    report = sample_domain(tiny_domain, tmp_path / "all", users=4, seed=0)
    for name in ("users.tsv", "items.tsv"):
        assert (tmp_path / "all" / name).read_bytes() == (tiny_domain / name).read_bytes()
    assert image_keys(tmp_path / "all" / "images.lmdb") == image_keys(tiny_domain / "images.lmdb")
    assert report.items_without_image == ["i6"] and report.images_stored == 5


def test_a_domain_without_images_gives_a_sample_without_images(tiny_domain, tmp_path):
    source = tmp_path / "text-only"
    source.mkdir()
    for name in ("users.tsv", "items.tsv"):
        (source / name).write_bytes((tiny_domain / name).read_bytes())
    report = sample_domain(source, tmp_path / "s", users=2, seed=0)
    assert report.images_stored is None and not (tmp_path / "s" / "images.lmdb").exists()
    assert "no images.lmdb" in report.summary()


def test_the_reference_codes_files_are_sampled_into_ours(tmp_path, caplog):
    source = tmp_path / "ref"
    source.mkdir()
    (source / "Sci_items_texts.tsv").write_text("v1\tA title\nv2\tAnother\nv3\tThird\n", encoding="utf-8")
    (source / "Sci_users.tsv").write_text("u1\tv1 v2 v1\nu2\tv3 v2 v3\n", encoding="utf-8")
    write_image_db(source / "Sci_items_images.lmdb", [("1", b"a pickled object")])
    report = sample_domain(source, tmp_path / "s", users=1, seed=0)
    sample = read_domain(tmp_path / "s")
    assert (tmp_path / "s" / "users.tsv").is_file() and len(sample.user_ids) == 1
    # Its LMDB holds pickles under other keys: left behind, said so, never copied under our name.
    assert report.images_stored is None and not (tmp_path / "s" / "images.lmdb").exists()
    assert report.not_carried == ["Sci_items_images.lmdb"] and "import-reference" in caplog.text


def test_users_with_no_interactions_make_no_domain(tmp_path):
    source = tmp_path / "empty"
    write_domain_tables(source, ["a"], ["Apple"], ["u1", "u2"], [[], []])
    with pytest.raises(PmmrecError, match="the 1 users drawn with seed 0 have no interactions"):
        sample_domain(source, tmp_path / "s", users=1)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("users", [0, -3])
def test_fewer_than_one_user_is_refused(tiny_domain, tmp_path, users):
    with pytest.raises(PmmrecError, match=f"--users must be a positive number of users, got {users}"):
        sample_domain(tiny_domain, tmp_path / "s", users=users)
    assert not (tmp_path / "s").exists()


def test_more_users_than_the_domain_has_names_both_numbers(tiny_domain, tmp_path):
    message = f"--users 9 but {tiny_domain} has 4 users; pass --users 4 or fewer"
    with pytest.raises(PmmrecError, match=message.replace("-", r"\-")):
        sample_domain(tiny_domain, tmp_path / "s", users=9)
    assert not (tmp_path / "s").exists()


def test_an_existing_folder_is_refused_unless_overwrite(tiny_domain, tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PmmrecError, match="already exists; pass --overwrite"):
        sample_domain(tiny_domain, out, users=2)
    assert (out / "keep.txt").read_text() == "mine"
    sample_domain(tiny_domain, out, users=2, overwrite=True)
    assert not (out / "keep.txt").exists() and len(read_domain(out).user_ids) == 2


def test_the_source_itself_is_never_the_output(tiny_domain, tmp_path):
    before = (tiny_domain / "users.tsv").read_bytes()
    for out in (tiny_domain, tiny_domain.parent):
        with pytest.raises(PmmrecError, match="is or contains the source domain"):
            sample_domain(tiny_domain, out, users=2, overwrite=True)
    assert (tiny_domain / "users.tsv").read_bytes() == before


def test_a_failure_part_way_leaves_nothing_behind(wide_domain, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old sample")
    calls = []

    def failing_get(self, item_id):
        calls.append(item_id)
        if len(calls) == 3:
            raise OSError("disk gone")
        return b"bytes"

    monkeypatch.setattr(sample_module.ImageDB, "get", failing_get)
    with pytest.raises(OSError, match="disk gone"):
        sample_domain(wide_domain, out, users=10, overwrite=True)
    assert len(calls) == 3  # it failed while copying images, after the tables were written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "wide"]  # no temporary folder left
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old folder is untouched


def test_the_command_line(tiny_domain, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["data", "sample", str(tiny_domain), "--users", "3", "--seed", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sampled 3 of 4 users (seed 1)" in printed and str(out) in printed
    assert json.loads((out / REPORT_FILE).read_text())["users"] == 3

    assert main(["data", "sample", str(tiny_domain), "--users", "3", "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["data", "sample", str(tiny_domain), "--users", "6040", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmmrec: error: --users 6040 but") and err.strip().count("\n") == 0
    assert "has 4 users; pass --users 4 or fewer" in err


def test_rest_holds_exactly_the_users_not_drawn_with_their_items_and_images(wide_domain, tmp_path):
    out, rest = tmp_path / "s", tmp_path / "rest"
    report = sample_domain(wide_domain, out, users=7, seed=3, rest=rest)
    alone = sample_domain(wide_domain, tmp_path / "alone", users=7, seed=3)
    for name in ("users.tsv", "items.tsv"):  # --rest does not change the sample
        assert (out / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()
    source, others = read_domain(wide_domain), read_domain(rest, empty_title="blank")
    histories = _histories(wide_domain)
    assert set(others.user_ids) == set(source.user_ids) - set(read_domain(out).user_ids)
    assert len(others.user_ids) == 33 and _histories(rest) == {u: histories[u] for u in others.user_ids}
    touched = {i for u in others.user_ids for i in histories[u]}
    assert others.item_ids == [i for i in source.item_ids if i in touched]
    source_images = _images(wide_domain / "images.lmdb")
    assert _images(rest / "images.lmdb") == {i: source_images[i] for i in others.item_ids if i in source_images}
    rest_report = json.loads((rest / REPORT_FILE).read_text(encoding="utf-8"))
    assert rest_report["rest"] is True and rest_report["users"] == 33 and rest_report["seed"] == 3
    assert (report.rest_out, report.rest_users, report.rest) == (str(rest), 33, False)
    assert alone.rest_out is None and "the 33 users not drawn" in report.summary()


def test_rest_refuses_when_no_user_is_left_or_it_is_the_sample_folder(wide_domain, tmp_path):
    with pytest.raises(PmmrecError, match="no user is left for --rest"):
        sample_domain(wide_domain, tmp_path / "s", users=40, rest=tmp_path / "r")
    with pytest.raises(PmmrecError, match="same folder as --out"):
        sample_domain(wide_domain, tmp_path / "s", users=4, rest=tmp_path / "s")
    (tmp_path / "r").mkdir()
    with pytest.raises(PmmrecError, match="already exists; pass --overwrite"):
        sample_domain(wide_domain, tmp_path / "s", users=4, rest=tmp_path / "r")
    assert not (tmp_path / "s").exists()  # refused before anything was written
    assert main(["data", "sample", str(wide_domain), "--users", "4", "--out", str(tmp_path / "s"), "--rest",
                 str(tmp_path / "r"), "--overwrite"]) == 0
    assert len(read_domain(tmp_path / "r").user_ids) == 36
