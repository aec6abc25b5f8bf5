"""Vocabulary, palettes and image drawing of the built-in world (docs/design.md §10; used by ``synth``).

The words are ordinary English words, so a real tokenizer (BERT wordpiece) gives meaningful tokens, and each
pool is disjoint from every other pool: category words, style words and each domain's filler words never
overlap. Images are drawn with Pillow and numpy: a style-coloured gradient, a style texture, a domain
decoration, one or two shapes (the category's own shape, most of the time) in style colours, then pixel noise,
encoded as real PNG or JPEG bytes.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]

# Per-category word pools (title content words); a category is also drawn as one shape (SHAPES, same order).
CATEGORIES: dict[str, tuple[str, ...]] = {name: tuple(words.split()) for name, words in {
    "ocean": "sea wave ship sailor harbor coral tide island anchor whale",
    "forest": "tree wolf woods oak hunter deer moss pine cabin owl",
    "space": "star planet rocket galaxy orbit comet moon astronaut alien nebula",
    "mountain": "peak summit climber glacier valley cliff ridge avalanche trail cave",
    "city": "street traffic taxi subway alley skyline avenue market bridge downtown",
    "desert": "sand dune camel oasis cactus mirage nomad canyon scorpion caravan",
    "music": "song guitar piano drum melody band concert rhythm singer chord",
    "sport": "ball team goal match race champion stadium coach league medal",
    "kitchen": "bread soup cake chef oven spice honey cheese pie feast",
    "garden": "flower rose seed bloom tulip bee orchard blossom petal gardener",
    "winter": "snow ice frost sled blizzard fireplace mitten snowman icicle reindeer",
    "castle": "king queen knight dragon throne crown sword kingdom prince fortress",
}.items()}
SHAPES = ("crescent", "triangle", "star", "diamond", "square", "semicircle", "circle", "pentagon", "hexagon",
          "ring", "cross", "arrow")


@dataclass(frozen=True)
class Style:
    """A latent style: a few title words (weak signal) and a palette and texture (strong image signal)."""

    name: str
    words: tuple[str, ...]
    background: tuple[RGB, RGB]  # vertical gradient, top to bottom
    palette: tuple[RGB, ...]  # shape colours
    texture: str  # stripes | grain | dots | checker | grid | hatch
    texture_colour: RGB


STYLES: dict[str, Style] = {s.name: s for s in (
    Style("vivid", ("bright", "sunny", "vivid", "golden", "cheerful"), ((255, 214, 90), (250, 160, 60)),
          ((230, 60, 40), (250, 120, 20), (200, 30, 90)), "stripes", (255, 240, 180)),
    Style("dark", ("midnight", "shadow", "dark", "gloomy", "silent"), ((20, 24, 60), (45, 30, 80)),
          ((90, 120, 210), (170, 175, 220), (60, 80, 160)), "grain", (200, 200, 255)),
    Style("pastel", ("gentle", "soft", "sweet", "tender", "dreamy"), ((250, 215, 230), (215, 240, 230)),
          ((180, 160, 230), (150, 200, 240), (250, 180, 170)), "dots", (255, 255, 255)),
    Style("rustic", ("old", "rustic", "ancient", "weathered", "humble"), ((170, 130, 85), (120, 85, 50)),
          ((90, 100, 40), (70, 45, 25), (190, 160, 100)), "checker", (140, 100, 60)),
    Style("neon", ("electric", "neon", "glowing", "wired", "laser"), ((10, 10, 12), (30, 10, 40)),
          ((255, 40, 200), (30, 240, 240), (150, 255, 40)), "grid", (60, 255, 120)),
    Style("mono", ("classic", "plain", "grey", "simple", "quiet"), ((220, 220, 220), (170, 170, 170)),
          ((40, 40, 40), (90, 90, 90), (250, 250, 250)), "hatch", (120, 120, 120)),
)}


@dataclass(frozen=True)
class Profile:
    """A domain's look: filler words in its titles and a decoration drawn on every image."""

    name: str
    filler: tuple[str, ...]
    decoration: str  # spine | letterbox | frame | plate | corners
    colour: RGB
    opacity: float  # how strongly the decoration covers what is under it


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("books", ("novel", "chapter", "edition", "volume", "tale", "story", "paperback", "saga", "memoir",
                      "illustrated"), "spine", (100, 40, 35), 1.0),
    Profile("films", ("movie", "film", "director", "sequel", "trilogy", "cinema", "documentary", "remastered",
                      "premiere", "episode"), "letterbox", (12, 12, 12), 1.0),
    Profile("games", ("game", "quest", "level", "arena", "multiplayer", "adventure", "puzzle", "simulator",
                      "legends", "tactics"), "frame", (40, 200, 90), 1.0),
    Profile("food", ("recipe", "menu", "flavor", "dish", "snack", "tasting", "homemade", "platter", "gourmet",
                     "sampler"), "plate", (245, 245, 240), 0.35),
    Profile("toys", ("toy", "plush", "kit", "figure", "playset", "collectible", "blocks", "model",
                     "miniature", "bundle"), "corners", (200, 60, 200), 1.0),
)}


def _regular(n: int, inner: float | None = None) -> list[tuple[float, float]]:
    """A regular n-gon (or a 2n-point star when ``inner`` is given) on the unit circle, pointing up."""
    points = 2 * n if inner else n
    return [((1.0 if k % 2 == 0 or not inner else inner) * math.cos(-math.pi / 2 + 2 * math.pi * k / points),
             (1.0 if k % 2 == 0 or not inner else inner) * math.sin(-math.pi / 2 + 2 * math.pi * k / points))
            for k in range(points)]


# Unit-square outlines of the polygon shapes; the round shapes are drawn with ellipses in ``_shape_mask``.
_POLYGONS = {
    "triangle": _regular(3), "pentagon": _regular(5), "hexagon": _regular(6), "star": _regular(5, inner=0.42),
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "diamond": [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "arrow": [(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)],
}


@functools.lru_cache(maxsize=8)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column index grids (S, S) and the gradient ramp (S, 1, 1) for images of side ``size``."""
    yy, xx = np.indices((size, size))
    return yy, xx, np.linspace(0.0, 1.0, size)[:, None, None]


@functools.lru_cache(maxsize=32)
def _decoration_mask(kind: str, size: int) -> np.ndarray:
    """Where a domain decoration covers the image, (S, S) bool. The same on every image of the domain."""
    yy, xx, _ = _grids(size)
    if kind == "spine":
        return xx < 0.16 * size
    if kind == "letterbox":
        return (yy < 0.12 * size) | (yy >= 0.88 * size)
    if kind == "frame":
        w = max(2, size // 20)
        return (yy < w) | (xx < w) | (yy >= size - w) | (xx >= size - w)
    if kind == "plate":
        c = (size - 1) / 2
        return (yy - c) ** 2 + (xx - c) ** 2 < (0.44 * size) ** 2
    if kind == "corners":
        return (xx + yy < 0.3 * size) | ((size - 1 - xx) + (size - 1 - yy) < 0.3 * size)
    raise ValueError(f"unknown decoration {kind!r}")


def _texture_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A style texture with a random period and phase, (S, S) bool."""
    yy, xx, _ = _grids(size)
    period, phase = 5 + int(rng.integers(4)), int(rng.integers(size))
    if kind == "stripes":
        return ((xx + yy + phase) // period) % 2 == 0
    if kind == "grain":
        return rng.random((size, size)) < 0.2
    if kind == "dots":
        return ((xx + phase) % period < 2) & ((yy + phase // 2) % period < 2)
    if kind == "checker":
        return ((xx + phase) // (2 * period) + (yy + phase) // (2 * period)) % 2 == 0
    if kind == "grid":
        return ((xx + phase) % period == 0) | ((yy + phase) % period == 0)
    if kind == "hatch":
        return (xx - yy + phase) % period < 2
    raise ValueError(f"unknown texture {kind!r}")


def _shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """One filled shape of radius ``r`` centred at (cx, cy), rotated by ``angle`` radians, (S, S) bool."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind in ("circle", "ring", "crescent"):
        draw.ellipse(box, fill=255)
        if kind == "ring":
            draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
        elif kind == "crescent":  # a circle with a shifted circle cut out of it
            dx, dy = 0.5 * r * math.cos(angle), 0.5 * r * math.sin(angle)
            draw.ellipse((box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy), fill=0)
    elif kind == "semicircle":
        start = math.degrees(angle) + 180
        draw.pieslice(box, start=start, end=start + 180, fill=255)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        points = [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in _POLYGONS[kind]]
        draw.polygon(points, fill=255)
    return np.asarray(mask) > 0


def draw_image(rng: np.random.Generator, category: int, num_categories: int, style: Style, profile: Profile,
               size: int, shape_fidelity: float, pixel_noise: float,
               jpeg_fraction: float) -> tuple[bytes, str]:
    """Draw one item image; returns the encoded bytes and the format (``PNG`` or ``JPEG``).

    The style decides every colour and the texture (strong signal); the category decides the shape, except
    with probability ``1 - shape_fidelity`` per shape (weak signal); the profile adds the domain's decoration.
    """
    _, _, ramp = _grids(size)
    top, bottom = (np.asarray(c, dtype=np.float32) + rng.integers(-12, 13, size=3) for c in style.background)
    img = np.broadcast_to((1.0 - ramp) * top + ramp * bottom, (size, size, 3)).copy()  # (S, S, 3)
    tex = _texture_mask(style.texture, size, rng)
    img[tex] = 0.5 * img[tex] + 0.5 * np.asarray(style.texture_colour, dtype=np.float32)
    deco = _decoration_mask(profile.decoration, size)
    deco_colour = np.asarray(profile.colour, dtype=np.float32)
    img[deco] = (1 - profile.opacity) * img[deco] + profile.opacity * deco_colour
    for _ in range(1 + int(rng.random() < 0.3)):
        kind = category if rng.random() < shape_fidelity else int(rng.integers(num_categories))
        r = size * rng.uniform(0.2, 0.34)
        cx, cy = rng.uniform(r, size - r, size=2)
        colour = np.asarray(style.palette[int(rng.integers(len(style.palette)))])
        colour = colour + rng.integers(-20, 21, size=3)
        img[_shape_mask(SHAPES[kind], size, cx, cy, r, rng.uniform(-0.35, 0.35))] = colour
    img += rng.normal(0.0, pixel_noise, size=img.shape)
    pixels = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    fmt = "JPEG" if rng.random() < jpeg_fraction else "PNG"
    buffer = io.BytesIO()
    pixels.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue(), fmt
