"""Hostile and unusual image files through `pmmrec data build-images` and the preprocessor (docs/design.md §13).

Every file with an image extension ends up either stored (and then preprocesses to a finite tensor) or listed
in the --report with a reason; nothing disappears silently. Hand-written PNG chunks make the headers Pillow's
encoder does not produce (16-bit, a decompression bomb that declares 20,000 x 20,000 pixels).
"""

import contextlib
import io
import json
import struct
import zlib

import numpy as np
import torch
from PIL import Image

from pmmrec.cli import main
from pmmrec.data.image_db import ImageDB
from pmmrec.data.images import ImagePreprocessor


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw_rows))
            + chunk(b"IEND", b""))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _files() -> tuple[dict[str, bytes], set[str]]:
    """name -> bytes, and the names that must be reported bad."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    jpeg = _encode(rgb, "JPEG", quality=90)
    palette = rgb.convert("P", palette=Image.ADAPTIVE, colors=8)
    palette.info["transparency"] = 0
    gray16_rows = b"".join(b"\x00" + np.arange(8, dtype=">u2").tobytes() * 1 for _ in range(6))
    files = {
        "rgb.jpg": jpeg,
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
        "gray.png": _encode(rgb.convert("L"), "PNG"),
        "gray16.png": _png(8, 6, 16, 0, gray16_rows),
        "palette_alpha.png": _encode(palette, "PNG"),
        "la.png": _encode(rgb.convert("LA"), "PNG"),
        "rgba.webp": _encode(rgb.convert("RGBA"), "WEBP"),
        "bilevel.bmp": _encode(rgb.convert("1"), "BMP"),
        "animated.gif": _encode(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.convert("P")]),
        "jpeg_named.png": jpeg,  # wrong extension: decoded by content
        "thin_strip.png": _encode(Image.new("RGB", (20_000, 1), (9, 9, 9)), "PNG"),  # extreme aspect ratio
        "zero.jpg": b"",
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "text.png": b"this is not an image\n",
        "bomb.png": _png(20_000, 20_000, 8, 2, b""),  # 400 Mpx declared: refused before decoding
        "bad_crc.png": _encode(rgb, "PNG")[:40] + b"\x00" * 8 + _encode(rgb, "PNG")[48:],
    }
    return files, {"zero.jpg", "truncated.jpg", "text.png", "bomb.png", "bad_crc.png"}


def test_every_image_is_stored_or_reported(tmp_path):
    files, bad = _files()
    src = tmp_path / "images"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "notes.txt").write_text("not an image extension: ignored, and counted")
    out, report_path = tmp_path / "images.lmdb", tmp_path / "report.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["data", "build-images", str(src), str(out), "--workers", "1", "--report", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    reported = {p.rsplit("/", 1)[-1]: reason for p, reason in ((b["path"], b["reason"]) for b in report["bad"])}
    assert set(reported) == bad, reported
    assert all(reason for reason in reported.values())
    assert "bomb" in reported["bomb.png"] or "over the limit" in reported["bomb.png"]
    assert "0 bytes" in reported["zero.jpg"]
    db = ImageDB(out)
    stored = {f"{k}.{ext}" for k in db for ext in ("jpg", "png", "webp", "bmp", "gif") if
              f"{k}.{ext}" in files}
    assert stored == set(files) - bad and report["stored"] == len(stored) and report["ignored"] == 1
    assert f"stored {len(stored)} images" in stdout.getvalue() and f"{len(bad)} bad" in stdout.getvalue()
    pre = ImagePreprocessor(size=32)
    for key in db:
        pixels = pre(db.get(key))
        assert pixels.shape == (3, 32, 32) and np.isfinite(pixels).all(), key
    batch = pre.batch([db.get(k) for k in sorted(db)] + [None])  # None: an item without an image
    assert batch.shape == (len(stored) + 1, 3, 32, 32) and torch.isfinite(batch).all()
    db.close()
