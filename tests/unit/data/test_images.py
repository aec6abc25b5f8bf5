"""Image decoding and preprocessing: colour modes, corrupt data, geometry, normalisation, HF configs."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pmmrec.data.images import (
    CLIP_MEAN,
    CLIP_STD,
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImagePreprocessor,
    decode_image,
)
from pmmrec.errors import DataError, PmmrecError


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunks(width: int, height: int, bit_depth: int, colour_type: int, raw_rows: bytes) -> bytes:
    """A PNG written by hand, for headers and bit depths Pillow's encoder does not produce."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw_rows))
            + chunk(b"IEND", b""))


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


# --- decode_image ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_decode_common_formats_to_rgb(fmt):
    image = decode_image(encode(Image.new("RGB", (12, 7), (200, 30, 60)), fmt))
    assert image.mode == "RGB" and image.size == (12, 7)


def test_grayscale_and_palette_convert_to_rgb():
    gray = decode_image(encode(Image.new("L", (4, 4), 77)))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    palette = Image.new("RGB", (4, 4), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert decode_image(encode(palette)).getpixel((1, 1)) == (10, 200, 30)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent: shows the white background
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black over white: mid grey
    image = decode_image(encode(rgba))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in image.getpixel((1, 0)))
    assert image.getpixel((2, 0)) == (255, 0, 0)
    gray_alpha = decode_image(encode(Image.new("LA", (3, 3), (0, 0))))
    assert gray_alpha.getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (3, 3), 0)
    palette.info["transparency"] = 0
    assert decode_image(encode(palette, transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_jpeg_converts():
    image = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    r, g, b = image.getpixel((4, 4))
    assert image.mode == "RGB" and r > 240 and g < 15 and b < 15


def test_16_bit_png_is_scaled_not_clipped():
    levels = np.array([[0, 257 * 100, 65535]], dtype=">u2")  # 16-bit grey: black, 100/255, white
    image = decode_image(png_chunks(3, 1, 16, 0, b"\x00" + levels.tobytes()))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100), (255, 255, 255)]
    rgb = np.array([[[65535, 0, 257 * 50]]], dtype=">u2")  # 16-bit RGB
    assert decode_image(png_chunks(1, 1, 16, 2, b"\x00" + rgb.tobytes())).getpixel((0, 0)) == (255, 0, 50)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = decode_image(encode(Image.new("RGB", (20, 10), (0, 0, 0)), "JPEG", exif=exif))
    assert image.size == (10, 20)


def test_truncated_jpeg_raises_data_error():
    data = encode(smooth_image(np.random.default_rng(0), 64, 64), "JPEG")
    with pytest.raises(DataError, match="corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"", b"hello, I am text\n", bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n garbage"])
def test_garbage_raises_data_error(data):
    with pytest.raises(DataError):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    # A 100,000 x 100,000 header in a few bytes: refused from the header alone, no 30 GB allocation.
    bomb = png_chunks(100_000, 100_000, 8, 2, b"")
    with pytest.raises(DataError, match="over the limit"):
        decode_image(bomb)
    with pytest.raises(DataError, match="over the limit"):
        decode_image(encode(Image.new("RGB", (20, 20))), max_pixels=399)


def test_unsupported_format_is_refused():
    with pytest.raises(DataError, match="not an image in a supported format"):
        decode_image(encode(Image.new("RGB", (4, 4)), "TIFF"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzzed_images_decode_or_raise_data_error(data):
    """Corrupting valid files anywhere gives an RGB image or a DataError, never another exception."""
    fmt = data.draw(st.sampled_from(["PNG", "JPEG", "WEBP", "GIF", "BMP"]))
    raw = bytearray(encode(Image.new("RGB", (9, 6), (40, 90, 200)), fmt))
    for _ in range(data.draw(st.integers(1, 6))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        image = decode_image(bytes(raw))
    except DataError:
        return
    assert image.mode == "RGB"


# --- ImagePreprocessor ----------------------------------------------------------------------------------------


def test_defaults_follow_the_imagenet_convention():
    p = ImagePreprocessor()
    assert (p.size, p.resize_shortest, p.crop, p.resample) == (224, 256, "center", 3)
    assert p.mean == IMAGENET_MEAN and p.std == IMAGENET_STD
    assert ImagePreprocessor(size=384).resize_shortest == 439  # 384 * 256 / 224 = 438.9


def test_solid_colour_is_normalised_by_hand():
    out = ImagePreprocessor()(Image.new("RGB", (50, 80), (255, 0, 51)))
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(out[channel], value, atol=1e-5)


def test_bytes_and_image_inputs_agree():
    image = smooth_image(np.random.default_rng(1), 90, 70)
    p = ImagePreprocessor(size=32)
    np.testing.assert_allclose(p(encode(image)), p(image), atol=1e-6)  # PNG is lossless


def test_center_crop_keeps_the_middle():
    # 300 x 100: red in the middle third, blue at both ends. Short side 100 -> 256, long side 300 -> 768; the
    # central 224 columns of 768 come from original x in [106, 194), inside the red third.
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (100, 0, 200, 100))
    out = ImagePreprocessor(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(image)
    assert out.shape == (3, 224, 224)
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[2], 0.0, atol=1e-6)


def test_no_crop_squashes_the_whole_image():
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 150, 100))  # left half red
    out = ImagePreprocessor(size=64, crop="none", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                            resample="nearest")(image)
    assert out.shape == (3, 64, 64)
    assert (out[0, :, :32] == 1.0).all() and (out[0, :, 32:] == 0.0).all()


def test_fast_jpeg_decoding_stays_close_to_a_full_decode():
    data = encode(smooth_image(np.random.default_rng(2), 1200, 900), "JPEG", quality=90)
    fast, full = ImagePreprocessor()(data), ImagePreprocessor(fast_jpeg=False)(data)
    assert fast.shape == full.shape == (3, 224, 224)
    assert float(np.abs(fast - full).mean()) < 0.03  # about 1/255 of the range, in normalised units


def test_efficientnet_lite_preset_is_tf_inception_style():
    p = ImagePreprocessor.efficientnet_lite()
    assert (p.size, p.resize_shortest, p.crop) == (224, 256, "center")
    assert p.mean == EFFICIENTNET_LITE_MEAN and p.std == EFFICIENTNET_LITE_STD
    # (pixel - 127) / 128: white is 1.0, black is -127/128, 127 is 0.
    for value, expected in [(255, 1.0), (0, -127 / 128), (127, 0.0)]:
        np.testing.assert_allclose(p(Image.new("RGB", (10, 10), (value,) * 3)), expected, atol=1e-5)


def test_batch_and_blank():
    p = ImagePreprocessor(size=16)
    image = Image.new("RGB", (20, 20), (255, 255, 255))
    out = p.batch([image, encode(image), None])
    assert isinstance(out, torch.Tensor) and out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[2], p.blank())
    assert p.blank().shape == (3, 16, 16) and not p.blank().any()
    # The blank input is the mean colour: a mean-coloured image preprocesses to it.
    mean_colour = tuple(round(m * 255) for m in (0.5, 0.5, 0.5))
    grey = ImagePreprocessor(size=16, mean=(mean_colour[0] / 255,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(grey.batch([Image.new("RGB", (16, 16), mean_colour)])[0], grey.blank())


@pytest.mark.parametrize("kwargs", [{"crop": "left"}, {"size": 0}, {"size": 224, "resize_shortest": 200},
                                    {"resample": "cubic-spline"}, {"mean": (0.5, 0.5)}, {"std": (0.5, 0.0, 0.5)}])
def test_invalid_settings_are_user_errors(kwargs):
    with pytest.raises(PmmrecError):
        ImagePreprocessor(**kwargs)


# --- Hugging Face preprocessor configs --------------------------------------------------------------------------

CLIP_CONFIG = {
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
}
VIT_CONFIG = {
    "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 224, "width": 224},
    "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def write_config(folder, config) -> str:
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return str(folder)


def test_from_pretrained_clip_like(tmp_path):
    p = ImagePreprocessor.from_pretrained(write_config(tmp_path / "clip", CLIP_CONFIG))
    assert (p.size, p.resize_shortest, p.crop, p.resample) == (224, 224, "center", 3)
    assert p.mean == pytest.approx(CLIP_MEAN) and p.std == pytest.approx(CLIP_STD)
    old_style = dict(CLIP_CONFIG, size=224, crop_size=224)  # configs from before size became a dict
    assert ImagePreprocessor.from_pretrained(write_config(tmp_path / "old", old_style)) == p


def test_from_pretrained_vit_like(tmp_path):
    p = ImagePreprocessor.from_pretrained(write_config(tmp_path / "vit", VIT_CONFIG))
    assert (p.size, p.crop, p.resample, p.mean, p.std) == (224, "none", 2, (0.5,) * 3, (0.5,) * 3)
    no_normalise = ImagePreprocessor.from_pretrained(write_config(tmp_path / "raw",
                                                                  dict(VIT_CONFIG, do_normalize=False)))
    assert no_normalise.mean == (0.0,) * 3 and no_normalise.std == (1.0,) * 3


def test_from_pretrained_refuses_hub_names_and_bad_folders(tmp_path):
    with pytest.raises(PmmrecError, match="cannot download.*local path"):
        ImagePreprocessor.from_pretrained("openai/clip-vit-base-patch32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="preprocessor_config.json"):
        ImagePreprocessor.from_pretrained(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        ImagePreprocessor.from_pretrained(tmp_path / "broken")
    rectangle = dict(VIT_CONFIG, size={"height": 224, "width": 160})
    with pytest.raises(DataError, match="square"):
        ImagePreprocessor.from_pretrained(write_config(tmp_path / "rect", rectangle))
    with pytest.raises(DataError, match="image_mean"):
        ImagePreprocessor.from_pretrained(write_config(tmp_path / "mean", dict(CLIP_CONFIG, image_mean=[0.5])))


def _hf_processor(name: str, config: dict):
    """The transformers image processor of that name (its Pillow backend: torchvision is not available)."""
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers has no {name}")
    try:
        return cls(**config)
    except ImportError as e:
        pytest.skip(f"transformers' {name} needs a missing package: {e}")


@pytest.mark.parametrize("name, config", [("CLIPImageProcessor", CLIP_CONFIG), ("ViTImageProcessor", VIT_CONFIG)])
def test_matches_the_transformers_image_processor(name, config):
    """Our preprocessing gives the model the same input as its own Hugging Face processor."""
    hf = _hf_processor(name, {k: v for k, v in config.items() if k != "image_processor_type"})
    ours = ImagePreprocessor.from_hf_dict(config)
    rng = np.random.default_rng(3)
    images = [smooth_image(rng, 300, 200), smooth_image(rng, 150, 401),
              Image.fromarray(rng.integers(0, 256, (97, 130, 3), dtype=np.uint8))]
    for image in images:
        expected = np.asarray(hf(images=image, return_tensors="np")["pixel_values"][0])
        np.testing.assert_allclose(ours(image), expected, atol=1e-2)
