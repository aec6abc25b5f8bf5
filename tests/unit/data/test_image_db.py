"""The image database and its builder (pmmrec data build-images)."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pmmrec.data import image_db
from pmmrec.data.image_db import BuildReport, ImageDB, build_image_db, image_keys, write_image_db
from pmmrec.errors import DataError, PmmrecError

REPO = Path(__file__).resolve().parents[3]
POSTERS = REPO.parent / "shared" / "datasets" / "movielens-1m" / "posters"


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def picture(width: int = 24, height: int = 16, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((width, height))
    return image if mode == "RGB" else image.convert(mode)


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def siblings(path: Path) -> list[str]:
    """Everything beside ``path`` in its folder (temporary build folders would show up here)."""
    return sorted(p.name for p in path.parent.iterdir())


def stored(out: Path) -> dict[str, bytes]:
    db = ImageDB(out)
    try:
        return {key: db.get(key) for key in db}
    finally:
        db.close()


@pytest.fixture
def good_dir(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """Three valid images of three formats, one in a subfolder, one with an upper-case extension."""
    folder = tmp_path / "images"
    files = {"a": ("a.png", encode(picture(seed=1), "PNG")),
             "b": ("sub/b.JPG", encode(picture(seed=2), "JPEG", quality=80)),
             "c": ("c.webp", encode(picture(seed=3), "WEBP"))}
    for name, data in files.values():
        put(folder / name, data)
    return folder, {item_id: data for item_id, (_, data) in files.items()}


def test_write_and_read_back(tmp_path):
    out = tmp_path / "db.lmdb"
    assert write_image_db(out, [("x", b"\x01\x02"), ("é", b"\x03")], commit_every=1) == 2
    db = ImageDB(out)
    assert len(db) == 2 and db.get("x") == b"\x01\x02" and db.get("é") == b"\x03" and db.get("y") is None
    assert "x" in db and "y" not in db
    assert image_keys(out) == {"x", "é"}
    with pytest.raises(DataError, match="not an image database"):
        ImageDB(tmp_path)


def test_good_images_are_stored_with_identical_bytes(good_dir, tmp_path):
    folder, expected = good_dir
    out = tmp_path / "images.lmdb"
    report = build_image_db(folder, out, workers=1, progress=False)
    assert stored(out) == expected
    assert (report.stored, report.bad, report.duplicates, report.unused) == (3, [], [], [])
    assert report.bytes_stored == sum(len(d) for d in expected.values()) and report.seconds > 0
    assert siblings(out) == ["images", "images.lmdb"]  # no temporary folder left


def test_bad_files_are_listed_with_their_paths(good_dir, tmp_path):
    folder, expected = good_dir
    jpeg = encode(picture(64, 64, seed=4), "JPEG")
    bad = {
        put(folder / "corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(200))): "not an image",
        put(folder / "empty.jpg", b""): "empty file",
        put(folder / "truncated.jpg", jpeg[: len(jpeg) // 2]): "corrupt",
        put(folder / "text.jpg", b"this is not a picture\n"): "not an image",
        put(folder / "deep/er/tiff.png", encode(picture(), "TIFF")): "supported format",
    }
    out = tmp_path / "images.lmdb"
    report = build_image_db(folder, out, workers=1, progress=False)
    assert stored(out) == expected
    reasons = dict(report.bad)
    assert set(reasons) == {str(p) for p in bad}
    for path, words in bad.items():
        assert words in reasons[str(path)]


def test_unusual_colour_modes_are_valid(tmp_path):
    folder = tmp_path / "images"
    put(folder / "gray.png", encode(picture(mode="L"), "PNG"))
    put(folder / "cmyk.jpg", encode(picture(mode="CMYK"), "JPEG"))
    put(folder / "rgba.png", encode(picture(mode="RGBA"), "PNG"))
    put(folder / "palette.gif", encode(picture(mode="P"), "GIF"))
    put(folder / "bitmap.bmp", encode(picture(), "BMP"))
    put(folder / "deep.png", encode(Image.fromarray(np.full((5, 5), 40000, dtype=np.uint16)), "PNG"))
    report = build_image_db(folder, tmp_path / "out.lmdb", workers=1, progress=False)
    assert report.bad == [] and report.stored == 6
    assert image_keys(tmp_path / "out.lmdb") == {"gray", "cmyk", "rgba", "palette", "bitmap", "deep"}


def test_duplicate_stems_are_listed_and_not_stored(good_dir, tmp_path):
    folder, expected = good_dir
    put(folder / "other/a.jpg", encode(picture(seed=9), "JPEG"))
    out = tmp_path / "images.lmdb"
    report = build_image_db(folder, out, workers=1, progress=False)
    assert report.duplicates == [("a", [str(folder / "a.png"), str(folder / "other/a.jpg")])]
    assert image_keys(out) == {"b", "c"}


def test_id_map_and_allowed_ids(good_dir, tmp_path):
    folder, expected = good_dir
    out = tmp_path / "images.lmdb"
    report = build_image_db(folder, out, workers=1, progress=False, id_map=lambda stem: None if stem == "c"
                            else f"v{stem}", allowed_ids={"va", "vz"})
    assert stored(out) == {"va": expected["a"]}
    assert sorted(report.unused) == sorted([str(folder / "sub/b.JPG"), str(folder / "c.webp")])


def test_hidden_and_other_files_are_ignored(good_dir, tmp_path):
    folder, _ = good_dir
    put(folder / "notes.txt", b"hello")
    put(folder / "._a.jpg", b"\x00\x05\x16\x07")  # a macOS resource fork, not an image
    put(folder / ".thumbnails/a.png", encode(picture(), "PNG"))
    report = build_image_db(folder, tmp_path / "out.lmdb", workers=1, progress=False)
    assert report.stored == 3 and report.bad == [] and report.ignored == 3


@pytest.mark.skipif(sys.platform != "linux", reason="file names of arbitrary bytes are a Linux thing")
def test_file_name_that_is_not_utf8_is_reported(good_dir, tmp_path):
    folder, _ = good_dir
    with open(os.path.join(os.fsencode(folder), b"\xff\xfe.png"), "wb") as f:
        f.write(encode(picture(), "PNG"))
    report = build_image_db(folder, tmp_path / "out.lmdb", workers=1, progress=False)
    assert report.stored == 3
    [(path, reason)] = report.bad
    assert "UTF-8" in reason and path.endswith(r"\udcff\udcfe.png")
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")  # the report stays writable


def test_resize_bounds_the_longer_side(tmp_path):
    folder = tmp_path / "images"
    put(folder / "wide.jpg", encode(picture(400, 200), "JPEG"))
    put(folder / "tall.png", encode(picture(120, 300, mode="RGBA"), "PNG"))
    small = put(folder / "small.webp", encode(picture(50, 40), "WEBP")).read_bytes()
    out = tmp_path / "out.lmdb"
    report = build_image_db(folder, out, workers=1, progress=False, resize=100)
    assert report.resized == 2 and report.stored == 3
    images = stored(out)
    wide, tall = Image.open(io.BytesIO(images["wide"])), Image.open(io.BytesIO(images["tall"]))
    assert (wide.format, wide.size) == ("JPEG", (100, 50))
    assert tall.format == "PNG" and tall.size == (40, 100)
    assert images["small"] == small  # already small enough: original bytes
    with pytest.raises(PmmrecError, match="resize"):
        build_image_db(folder, tmp_path / "x.lmdb", resize=0, progress=False)


def test_decompression_bomb_is_bad(tmp_path):
    folder = tmp_path / "images"
    put(folder / "big.png", encode(picture(30, 30), "PNG"))
    put(folder / "ok.png", encode(picture(10, 10), "PNG"))
    report = build_image_db(folder, tmp_path / "out.lmdb", workers=1, progress=False, max_pixels=500)
    assert report.stored == 1 and "over the limit" in dict(report.bad)[str(folder / "big.png")]


def test_existing_output_is_refused_then_replaced_with_overwrite(good_dir, tmp_path):
    folder, expected = good_dir
    out = tmp_path / "images.lmdb"
    write_image_db(out, [("old", b"old bytes")])
    with pytest.raises(PmmrecError, match="already exists"):
        build_image_db(folder, out, workers=1, progress=False)
    assert stored(out) == {"old": b"old bytes"}
    build_image_db(folder, out, workers=1, progress=False, overwrite=True)
    assert stored(out) == expected
    assert siblings(out) == ["images", "images.lmdb"]


def test_missing_empty_and_imageless_folders_are_user_errors(tmp_path):
    with pytest.raises(PmmrecError, match="nowhere.*not found"):
        build_image_db(tmp_path / "nowhere", tmp_path / "out.lmdb", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PmmrecError, match="no image files"):
        build_image_db(tmp_path / "empty", tmp_path / "out.lmdb", progress=False)
    put(tmp_path / "docs/readme.txt", b"hi")
    with pytest.raises(PmmrecError, match="no image files.*1 other files ignored"):
        build_image_db(tmp_path / "docs", tmp_path / "out.lmdb", progress=False)
    assert not (tmp_path / "out.lmdb").exists()


def test_all_bad_is_an_error_and_writes_nothing(tmp_path):
    folder = tmp_path / "images"
    put(folder / "1.jpg", b"nope")
    put(folder / "2.png", b"")
    out = tmp_path / "out.lmdb"
    with pytest.raises(PmmrecError, match="none of the 2 images decodes"):
        build_image_db(folder, out, workers=1, progress=False)
    assert siblings(out) == ["images"]


def test_nothing_usable_after_mapping_is_an_error(good_dir, tmp_path):
    folder, _ = good_dir
    with pytest.raises(PmmrecError, match="3 unused ids"):
        build_image_db(folder, tmp_path / "out.lmdb", allowed_ids=set(), progress=False)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_mid_build_leaves_no_half_written_output(good_dir, tmp_path, monkeypatch, existing):
    folder, _ = good_dir
    out = tmp_path / "images.lmdb"
    if existing:
        write_image_db(out, [("old", b"old bytes")])
    real, calls = image_db.check_image_file, []

    def crash_on_third(*args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real(*args)

    monkeypatch.setattr(image_db, "check_image_file", crash_on_third)
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_image_db(folder, out, workers=1, progress=False, overwrite=True)
    assert siblings(out) == (["images", "images.lmdb"] if existing else ["images"])
    if existing:
        assert stored(out) == {"old": b"old bytes"}


def test_parallel_build_matches_serial(tmp_path):
    folder = tmp_path / "images"
    for k in range(60):
        put(folder / f"{k:02d}.png", encode(picture(seed=k), "PNG") if k % 7 else b"broken")
    serial = build_image_db(folder, tmp_path / "serial.lmdb", workers=1, progress=False)
    parallel = build_image_db(folder, tmp_path / "parallel.lmdb", workers=2, progress=True)
    assert parallel.bad == serial.bad and len(serial.bad) == 9
    assert stored(tmp_path / "parallel.lmdb") == stored(tmp_path / "serial.lmdb")


def test_report_serialises(good_dir, tmp_path):
    folder, _ = good_dir
    put(folder / "x.jpg", b"bad")
    report = build_image_db(folder, tmp_path / "out.lmdb", workers=1, progress=False)
    report.write_report(tmp_path / "report.json")
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["stored"] == 3 and saved["bad"] == [{"path": str(folder / "x.jpg"), "reason": dict(report.bad)[
        str(folder / "x.jpg")]}]
    assert "stored 3 images" in report.summary() and "1 bad" in report.summary()
    assert isinstance(report, BuildReport)


def _read_all(db: ImageDB) -> dict[str, int]:
    return {key: len(db.get(key)) for key in sorted(db.keys())}


def _read_in_child(db: ImageDB, queue) -> None:
    queue.put(_read_all(db))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_image_db_reads_back_from_forked_processes(good_dir, tmp_path):
    folder, expected = good_dir
    out = tmp_path / "images.lmdb"
    build_image_db(folder, out, workers=1, progress=False)
    db = ImageDB(out)
    want = _read_all(db)  # the parent's handle is open before the fork
    assert want == {k: len(v) for k, v in expected.items()}
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_read_in_child, args=(db, queue)) for _ in range(2)]
    for child in children:
        child.start()
    results = [queue.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert results == [want, want]
    with context.Pool(2) as pool:  # pickled copies (DataLoader workers) open their own handles too
        assert pool.map(_read_all, [db, db]) == [want, want]
    assert _read_all(db) == want  # the parent's handle still works
    db.close()


@pytest.mark.shared_data
def test_movielens_posters_build(tmp_path):
    if not POSTERS.is_dir():
        pytest.skip(f"shared dataset absent: {POSTERS}")
    count = sum(1 for p in POSTERS.iterdir() if p.suffix.lower() == ".jpg")
    report = build_image_db(POSTERS, tmp_path / "posters.lmdb", progress=False)
    assert report.bad == [] and report.duplicates == [] and report.stored == count
    assert report.seconds < 60
    assert len(image_keys(tmp_path / "posters.lmdb")) == count
