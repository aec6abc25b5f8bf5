"""Importing the PMMRec authors' release (pmmrec data import-reference), including hostile pickles."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from pmmrec.cli import main
from pmmrec.data.domain import read_domain
from pmmrec.data.image_db import ImageDB
from pmmrec.data.reference import (
    RefusedPickle,
    find_reference_files,
    import_reference,
    reference_key,
    unpickle_image,
)
from pmmrec.errors import DataError, PmmrecError


class LMDB_Image:  # noqa: N801 - the reference's class name, which its pickles record
    """The reference's image holder as its LMDB values store it: raw uint8 pixels plus shape."""

    def __init__(self, image: np.ndarray, item_id: str):
        self.channels = image.shape[2]
        self.size = image.shape[:2]
        self.image = image.tobytes()
        self.id = item_id


class _System:
    """A hostile value: unpickling it would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def pixels(seed: int, height: int = 6, width: int = 5, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def write_reference(root: Path, name: str = "bilibili_food", values: dict[str, bytes] | None = None,
                    single_file: bool = False) -> dict[str, np.ndarray]:
    """A reference-format release: texts + users TSVs (no headers) and a pickled-image LMDB keyed "123"."""
    root.mkdir(parents=True, exist_ok=True)
    items = {"v1": "Spicy noodles", "v2": "Dumplings at home", "v17": "Mapo tofu", "v040": "Green tea cake"}
    (root / f"{name}_items_texts.tsv").write_text("".join(f"{k}\t{t}\n" for k, t in items.items()), "utf-8")
    (root / f"{name}_users.tsv").write_text("u1\tv1 v2 v17\nu2\tv17 v040 v1 v2\nu3\tv2 v1 v040\n", "utf-8")
    arrays = {"v1": pixels(1), "v2": pixels(2, channels=1), "v17": pixels(3, channels=4)}
    if values is None:
        values = {reference_key(k): pickle.dumps(LMDB_Image(a, k)) for k, a in arrays.items()}
        values["999"] = pickle.dumps(LMDB_Image(pixels(9), "v999"))  # an image of no item
    path = root / f"{name}_items_images.lmdb"
    env = lmdb.open(str(path), subdir=not single_file, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key.encode("ascii"), value)
    env.close()
    return arrays


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_reference_keys_follow_the_reference_rule():
    assert reference_key("v123") == "123"
    assert reference_key("v040") == "40"
    assert reference_key("item-a") == "item-a"  # not an integer after removing 'v': looked up as it is


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_unpickles_the_image_holder_at_every_protocol(protocol):
    array = pixels(5)
    assert np.array_equal(unpickle_image(pickle.dumps(LMDB_Image(array, "v5"), protocol=protocol)), array)


def test_unpickles_a_plain_uint8_array():
    array = pixels(6)
    assert np.array_equal(unpickle_image(pickle.dumps(array)), array)
    assert unpickle_image(pickle.dumps(array[:, :, 0])).shape == (6, 5, 1)


def test_round_trip_into_a_readable_domain(tmp_path):
    arrays = write_reference(tmp_path / "bili_food")
    report = import_reference(tmp_path / "bili_food", tmp_path / "food", progress=False)
    assert (report.items, report.users, report.interactions) == (4, 3, 10)
    assert report.images_stored == 3 and report.missing_images == ["v040"] and report.unused_entries == 1

    domain = read_domain(tmp_path / "food", missing_image="blank")
    assert domain.item_ids == ["v1", "v2", "v17", "v040"]
    assert domain.titles[1] == "Dumplings at home"
    assert domain.user_ids == ["u1", "u2", "u3"]
    assert [list(s) for s in domain.sequences] == [[1, 2, 3], [3, 4, 1, 2], [2, 1, 4]]
    db = ImageDB(domain.image_db)
    try:
        assert db.keys() == {"v1", "v2", "v17"}
        for item_id, array in arrays.items():
            data = db.get(item_id)
            assert data.startswith(b"\x89PNG")  # encoded bytes, never a pickle
            assert np.array_equal(decoded(data).reshape(array.shape), array)  # PNG is lossless
    finally:
        db.close()
    saved = json.loads((tmp_path / "food" / "import_report.json").read_text())
    assert saved["missing_images"] == ["v040"]


def test_a_single_file_lmdb_and_an_explicit_name(tmp_path):
    write_reference(tmp_path / "src", name="books", single_file=True)
    write_reference(tmp_path / "src", name="films")
    with pytest.raises(PmmrecError, match="not a domain folder"):  # two releases: --name must choose
        find_reference_files(tmp_path / "src")
    report = import_reference(tmp_path / "src", tmp_path / "books", name="books", progress=False)
    assert report.images_stored == 3


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    values = {"1": pickle.dumps(LMDB_Image(pixels(1), "v1")), "2": pickle.dumps(_System(f"touch {marker}"))}
    write_reference(tmp_path / "ref", values=values)
    with pytest.raises(DataError, match=r"key '2'.*refusing to unpickle (posix|os)\.system") as e:
        import_reference(tmp_path / "ref", tmp_path / "out", progress=False)
    assert "v2" in str(e.value)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("payload", [
    pickle.dumps(_System("true")),
    # a hostile object nested inside an innocent container
    pickle.dumps({"image": _System("true")}),
    b"cbuiltins\neval\n(S'1+1'\ntR.",
    b"csubprocess\nPopen\n(S'true'\ntR.",
])
def test_any_other_global_is_refused(payload):
    with pytest.raises(RefusedPickle, match="refusing to unpickle"):
        unpickle_image(payload)


def test_hostile_state_inside_the_holder_is_refused():
    holder = LMDB_Image(pixels(1), "v1")
    holder.id = _System("true")
    with pytest.raises(RefusedPickle):
        unpickle_image(pickle.dumps(holder))


@pytest.mark.parametrize("payload, reason", [
    (b"not a pickle", "not a readable pickle"),
    (pickle.dumps(LMDB_Image(pixels(1), "v1"))[:-10], "not a readable pickle"),
    (pickle.dumps(np.zeros((4, 4), dtype=np.float32)), "expected uint8"),
    (pickle.dumps([1, 2, 3]), "expected an image holder"),
])
def test_corrupt_values_are_reported_not_imported(payload, reason):
    with pytest.raises(ValueError, match=reason):
        unpickle_image(payload)


def test_corrupt_holder_fields_are_checked():
    holder = LMDB_Image(pixels(1), "v1")
    holder.size = (100, 100)  # more pixels than bytes
    with pytest.raises(ValueError, match="bytes of pixels"):
        unpickle_image(pickle.dumps(holder))


def test_corrupt_image_is_listed_and_the_rest_imported(tmp_path):
    values = {"1": pickle.dumps(LMDB_Image(pixels(1), "v1")), "2": b"garbage"}
    write_reference(tmp_path / "ref", values=values)
    report = import_reference(tmp_path / "ref", tmp_path / "out", progress=False)
    assert report.images_stored == 1 and report.num_bad_images == 1
    assert report.bad_images[0]["item"] == "v2" and report.bad_images[0]["key"] == "2"
    assert set(report.missing_images) == {"v2", "v17", "v040"}


def test_bad_tables_name_the_line(tmp_path):
    write_reference(tmp_path / "ref")
    (tmp_path / "ref" / "bilibili_food_users.tsv").write_text("u1\tv1 v2 v3\n", "utf-8")
    with pytest.raises(DataError, match=r"_users\.tsv.*line 1: 'v3'"):
        import_reference(tmp_path / "ref", tmp_path / "out", progress=False)


def test_refuses_an_existing_output_and_a_pmmrec_domain(tmp_path, tiny_domain):
    write_reference(tmp_path / "ref")
    (tmp_path / "out").mkdir()
    with pytest.raises(PmmrecError, match="already exists"):
        import_reference(tmp_path / "ref", tmp_path / "out", progress=False)
    with pytest.raises(PmmrecError, match="already a pmmrec domain"):
        import_reference(tiny_domain, tmp_path / "other", progress=False)


def test_cli(tmp_path, capsys):
    write_reference(tmp_path / "ref")
    code = main(["data", "import-reference", str(tmp_path / "ref"), "--out", str(tmp_path / "food"),
                 "--image-format", "jpeg"])
    assert code == 0, capsys.readouterr().err
    assert "3 stored as jpeg" in capsys.readouterr().out
    db = ImageDB(tmp_path / "food" / "images.lmdb")
    try:
        assert db.get("v1").startswith(b"\xff\xd8")  # JPEG
    finally:
        db.close()
