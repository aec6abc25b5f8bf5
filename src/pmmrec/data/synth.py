"""The built-in multi-domain world: synthetic domains whose structure makes the paper's claims testable.

docs/design.md §10. Every item has a latent *concept* = (category, style). The title reveals the category
strongly (words from a per-category pool) and the style weakly (sometimes a style word, sometimes the wrong
one); the image reveals the style strongly (palette and texture) and the category weakly (the drawn shape,
sometimes the wrong one). Users walk a sparse Markov chain over concepts that every domain shares (the
"universal transition patterns" that, as PMMRec's introduction argues, transfer should carry), pick an item
of the concept by Zipf popularity, and sometimes click a random item instead (noise, so NID/RCL have
something to find).

``synthesize_world`` writes ordinary domain folders (section 3), one per domain, plus the ground truth, which
stays out of the domain folders so nothing downstream can read it by accident::

    <out>/<domain>/{items.tsv, users.tsv, images.lmdb/}   sources first, then the target (named ``target``)
    <out>/truth/<domain>.tsv   item_id, concept, category, style, their names, popularity rank in the concept
    <out>/world.json           seed, resolved config, concept names, transition matrix, per-domain counts

The same seed gives byte-identical files: every random draw comes from a generator seeded by
``(seed, purpose, domain, ...)``, never from global state.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pmmrec.data.domain import IMAGES_DB, write_domain_tables
from pmmrec.data.image_db import write_image_db
from pmmrec.data.synth_assets import CATEGORIES, PROFILES, STYLES, Profile, draw_image
from pmmrec.errors import ConfigError, DataError
from pmmrec.utils.io import atomic_dir, atomic_write_text

logger = logging.getLogger(__name__)

WORLD_FILE, TRUTH_DIR = "world.json", "truth"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Sizes used when a size field is left as None: (default world, quick world).
_SIZES = {"items_per_concept": (8, 2), "target_items_per_concept": (6, 2),
          "source_users": (2500, 150), "target_users": (300, 60)}
# Title templates. Their joining words are shared by all concepts, so they carry no signal.
_TEMPLATES = ("{a} {b}", "the {a} of the {b}", "{a} and the {b}", "{a} in the {b}", "{b} {a}")
_SMALL_WORDS = {"the", "of", "and", "in"}


@dataclass
class SynthConfig:
    """How the world is built. Size fields left as ``None`` get defaults (small ones with ``quick``)."""

    seed: int = 0  # master seed: the same seed gives byte-identical files
    quick: bool = False  # tiny world for tests (about 100 items per domain, 150 users per source)
    num_categories: int = 12  # latent categories (at most len(CATEGORIES)); the title reveals them
    num_styles: int = 4  # latent styles (at most len(STYLES)); the image reveals them
    sources: tuple[str, ...] = ("books", "films", "games")  # source domain folder names
    target: str = "target"  # target domain folder name (docs/design.md §15)
    items_per_concept: int | None = None  # items per concept in each source (None: 8, quick: 2)
    target_items_per_concept: int | None = None  # items per concept in the target (None: 6, quick: 2)
    source_users: int | None = None  # users per source domain (None: 2500, quick: 150)
    target_users: int | None = None  # users in the target domain (None: 300, quick: 60)
    min_len: int = 5  # shortest user sequence
    max_len: int = 40  # longest user sequence
    mean_len: float = 12.0  # mean sequence length before truncation at max_len (geometric tail)
    noise: float = 0.1  # chance that a click after the first is on a random unseen item, off the chain
    next_concepts: int = 3  # likely next concepts of each concept (the sparse transition structure)
    stay: float = 0.1  # probability that the next click stays in the same concept
    zipf: float = 1.0  # Zipf exponent of item popularity within a concept
    category_words: int = 2  # category words per title
    title_noise: float = 0.05  # chance that a category word comes from a random other category
    style_word_prob: float = 0.5  # chance that a title carries a style word (the weak style signal)
    style_word_noise: float = 0.3  # chance that such a style word belongs to a random style
    image_size: int = 64  # square image side in pixels; the image encoder's preprocessing resizes later
    shape_fidelity: float = 0.75  # chance that a drawn shape is the category's own (the weak category signal)
    pixel_noise: float = 8.0  # standard deviation of Gaussian pixel noise, on the 0-255 scale
    jpeg_fraction: float = 0.5  # fraction of images stored as JPEG; the rest are PNG

    def __post_init__(self):
        self.sources = tuple(self.sources)
        for name, (default, quick) in _SIZES.items():
            if getattr(self, name) is None:
                setattr(self, name, quick if self.quick else default)
        names = [*self.sources, self.target]
        bad = [n for n in names if not _NAME.match(n) or n == TRUTH_DIR]
        if bad or len(set(names)) != len(names) or not self.sources:
            raise ConfigError(f"synth: domain names must be distinct lowercase identifiers other than "
                              f"'{TRUTH_DIR}', with at least one source; got sources={list(self.sources)} "
                              f"target={self.target!r}")
        fewest = self.num_concepts * min(self.items_per_concept, self.target_items_per_concept)
        rules = [  # (field, holds, what it must be)
            ("num_categories", 2 <= self.num_categories <= len(CATEGORIES), f"in [2, {len(CATEGORIES)}]"),
            ("num_styles", 2 <= self.num_styles <= len(STYLES), f"in [2, {len(STYLES)}]"),
            ("next_concepts", 1 <= self.next_concepts < self.num_concepts, "in [1, number of concepts)"),
            ("min_len", 2 <= self.min_len <= self.max_len, "in [2, max_len]"),
            ("mean_len", self.min_len <= self.mean_len, "at least min_len"),
            ("items_per_concept", fewest >= self.max_len, "large enough for max_len items in every domain"),
            ("source_users", self.source_users >= 1, "at least 1"),
            ("target_users", self.target_users >= 1, "at least 1"),
            ("image_size", self.image_size >= 16, "at least 16"),
            ("category_words", 1 <= self.category_words <= 4, "in [1, 4]"),
            ("noise", 0.0 <= self.noise < 1.0, "in [0, 1)"),
        ]
        rules += [(name, 0.0 <= getattr(self, name) <= 1.0, "in [0, 1]") for name in (
            "stay", "title_noise", "style_word_prob", "style_word_noise", "shape_fidelity", "jpeg_fraction")]
        failed = [f"{name}={getattr(self, name)!r} (must be {rule})" for name, ok, rule in rules if not ok]
        if failed:
            raise ConfigError(f"synth: invalid {'; '.join(failed)}")

    @property
    def num_concepts(self) -> int:
        return self.num_categories * self.num_styles


@dataclass
class DomainSummary:
    """What was written for one domain."""

    name: str
    role: str  # "source" or "target"
    num_items: int
    num_users: int
    num_interactions: int
    noise_clicks: int  # clicks drawn as noise (random unseen item)
    dead_ends: int  # chain steps with no unseen item in any likely next concept, filled by a random item


@dataclass
class WorldSummary:
    """What ``synthesize_world`` wrote and how long it took."""

    path: Path
    domains: list[DomainSummary]
    seconds: float

    def format(self) -> str:
        """One line per domain, for the terminal."""
        lines = [f"wrote {len(self.domains)} domains to {self.path} in {self.seconds:.1f}s"]
        for d in self.domains:
            lines.append(f"  {d.name:10s} {d.role:6s} {d.num_items:6,d} items {d.num_users:7,d} users "
                         f"{d.num_interactions:9,d} interactions ({d.noise_clicks:,d} noise clicks)")
        return "\n".join(lines)


def synthesize_world(out: str | Path, config: SynthConfig | None = None,
                     overwrite: bool = False) -> WorldSummary:
    """Write the world into the new folder ``out`` (atomically: it appears complete or not at all)."""
    config = config or SynthConfig()
    start = time.perf_counter()
    # The transition structure comes from the world's seed alone: every domain shares it.
    next_ids, next_probs = make_transitions(np.random.default_rng([config.seed, 0]), config)
    roles = [(name, "source") for name in config.sources] + [(config.target, "target")]
    prefixes = _item_prefixes([name for name, _ in roles])
    summaries, entries = [], []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for index, (name, role) in enumerate(roles):
            profile = PROFILES.get(name) or list(PROFILES.values())[index % len(PROFILES)]
            summary, entry = _write_domain(tmp, index, name, role, prefixes[name], profile, next_ids,
                                           next_probs, config)
            summaries.append(summary)
            entries.append(entry)
        world = {
            "format": "pmmrec-synth-world", "version": 1, "seed": config.seed, "config": asdict(config),
            "categories": list(CATEGORIES)[:config.num_categories],
            "styles": list(STYLES)[:config.num_styles],
            "concept_index": "concept = category * num_styles + style",
            "transitions": [[[int(n), float(p)] for n, p in zip(ids, probs, strict=True)]
                            for ids, probs in zip(next_ids, next_probs, strict=True)],
            "domains": entries,
        }
        atomic_write_text(tmp / WORLD_FILE, json.dumps(world, indent=1) + "\n")
    seconds = time.perf_counter() - start
    logger.info("wrote a %d-domain world to %s in %.1f s", len(roles), out, seconds)
    return WorldSummary(Path(out), summaries, seconds)


def make_transitions(rng: np.random.Generator, config: SynthConfig) -> tuple[np.ndarray, np.ndarray]:
    """The shared sparse chain: for each concept, its likely next concepts (C, K+1) and their probabilities.

    Concepts are laid on a random cycle and concept ``cycle[i]`` leads to ``cycle[i + offset_k]`` for K
    distinct offsets, so every concept has K successors and K predecessors (no concept is unreachable), plus
    itself with probability ``stay``. The K weights of each concept are Dirichlet draws, so rows differ.
    """
    c, k = config.num_concepts, config.next_concepts
    cycle = rng.permutation(c)
    offsets = rng.choice(np.arange(1, c), size=k, replace=False)
    position = np.empty(c, dtype=np.int64)
    position[cycle] = np.arange(c)
    successors = cycle[(position[:, None] + offsets[None, :]) % c]  # (C, K)
    weights = rng.dirichlet(np.full(k, 2.0), size=c) * (1.0 - config.stay)  # (C, K)
    next_ids = np.concatenate([np.arange(c)[:, None], successors], axis=1)  # (C, K+1), column 0 = stay
    next_probs = np.concatenate([np.full((c, 1), config.stay), weights], axis=1)
    return next_ids, next_probs


def transition_matrix(next_ids: np.ndarray, next_probs: np.ndarray) -> np.ndarray:
    """Dense (C, C) matrix of the sparse chain; row c is the distribution of the concept after c."""
    c = len(next_ids)
    dense = np.zeros((c, c))
    np.add.at(dense, (np.repeat(np.arange(c), next_ids.shape[1]), next_ids.ravel()), next_probs.ravel())
    return dense


def _item_prefixes(names: list[str]) -> dict[str, str]:
    """Two-letter item id prefixes (``bo17``) when they are distinct and alphabetic, else ``<name>_``."""
    short = [n[:2] for n in names]
    if len(set(short)) == len(names) and all(s.isalpha() and len(s) == 2 for s in short):
        return dict(zip(names, short, strict=True))
    return {n: f"{n}_" for n in names}


def _title(rng: np.random.Generator, category: int, style: int, profile: Profile, config: SynthConfig) -> str:
    """A title: category words (strong signal), maybe one style word (weak, noisy), domain filler words."""
    pools = list(CATEGORIES.values())[:config.num_categories]
    words = []
    for _ in range(config.category_words):
        pool = pools[category]
        if rng.random() < config.title_noise:  # a word from a random other category
            other = category + 1 + int(rng.integers(config.num_categories - 1))
            pool = pools[other % config.num_categories]
        candidates = [w for w in pool if w not in words]
        words.append(candidates[int(rng.integers(len(candidates)))])
    if rng.random() < config.style_word_prob:
        s = style if rng.random() >= config.style_word_noise else int(rng.integers(config.num_styles))
        style_words = list(STYLES.values())[s].words
        at = int(rng.integers(len(words)))
        words[at] = f"{style_words[int(rng.integers(len(style_words)))]} {words[at]}"
    a, b = (words + [words[0]])[:2]
    phrase = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(a=a, b=b)
    if len(words) > 2:
        phrase += " " + " ".join(words[2:])
    filler = " ".join(rng.choice(profile.filler, size=1 + int(rng.random() < 0.4), replace=False))
    text = f"{filler}: {phrase}" if rng.random() < 0.4 else f"{phrase} {filler}"
    if rng.random() < 0.25:
        text += f" {2 + int(rng.integers(8))}"
    return " ".join(w if i and w in _SMALL_WORDS else w.capitalize() for i, w in enumerate(text.split()))


def _simulate_users(rng: np.random.Generator, n_users: int, item_concept: np.ndarray, next_ids: np.ndarray,
                    next_probs: np.ndarray, zipf_weights: np.ndarray, config: SynthConfig,
                    desc: str) -> tuple[list[list[int]], int, int]:
    """Walk the concept chain for each user. Returns sequences of item indices, noise clicks, dead ends.

    A user never clicks the same item twice (so leave-one-out targets are never already in the history). A
    noise click leaves the chain's state where it was: the next real click follows the last real concept.
    """
    n_items, c = len(item_concept), config.num_concepts
    concept_items = [np.flatnonzero(item_concept == k).tolist() for k in range(c)]
    item_weight = zipf_weights.tolist()
    ids, probs = next_ids.tolist(), next_probs.tolist()
    tail = rng.geometric(1.0 / (config.mean_len - config.min_len + 1.0), size=n_users) - 1
    lengths = np.minimum(config.min_len + tail, config.max_len)
    starts = rng.integers(c, size=n_users)
    # (clicks, 3): noise or not, which concept (or which noise item), which item of the concept
    uniforms = rng.random((int(lengths.sum()), 3)).tolist()
    sequences, noise_clicks, dead_ends, row = [], 0, 0, 0
    for user in tqdm(range(n_users), desc=desc, disable=config.quick or None, leave=False):
        seen: set[int] = set()
        left = [len(items) for items in concept_items]  # unseen items per concept
        seq: list[int] = []
        concept = -1  # no real click yet
        for _ in range(int(lengths[user])):
            u_noise, u_next, u_item = uniforms[row]
            row += 1
            item, dead_end = None, False
            if concept >= 0 and u_noise < config.noise:
                noise_clicks += 1
            else:
                if concept < 0:
                    options, weights = [int(starts[user])], [1.0]
                else:
                    options, weights = ids[concept], probs[concept]
                open_ = [k for k, o in enumerate(options) if left[o]]  # concepts with an unseen item
                nxt = _draw([options[k] for k in open_], [weights[k] for k in open_], u_next)
                if nxt is None:  # every likely next concept is used up
                    dead_ends, dead_end = dead_ends + 1, True
                else:
                    concept = nxt
                    cands = [i for i in concept_items[concept] if i not in seen]
                    item = _draw(cands, [item_weight[i] for i in cands], u_item)
            if item is None:  # uniform over unseen items, by probing from a random start
                item = int(u_next * n_items)
                while item in seen:
                    item = (item + 1) % n_items
                if dead_end:  # the chain restarts from the random item's concept
                    concept = int(item_concept[item])
            seen.add(item)
            left[int(item_concept[item])] -= 1
            seq.append(item)
        sequences.append(seq)
    return sequences, noise_clicks, dead_ends


def _draw(options: list[int], weights: list[float], u: float) -> int | None:
    """Inverse-CDF draw of one option with probability proportional to its weight (None if no options)."""
    if not options:
        return None
    target, acc = u * sum(weights), 0.0
    for option, weight in zip(options, weights, strict=True):
        acc += weight
        if target < acc:
            return option
    return options[-1]


def _write_domain(world: Path, index: int, name: str, role: str, prefix: str, profile: Profile,
                  next_ids: np.ndarray, next_probs: np.ndarray,
                  config: SynthConfig) -> tuple[DomainSummary, dict]:
    """Generate and write one domain folder and its ground truth; return its summary and world.json entry."""
    rng = np.random.default_rng([config.seed, 1, index, 0])
    per_concept = config.items_per_concept if role == "source" else config.target_items_per_concept
    n_users = config.source_users if role == "source" else config.target_users
    # Items in a random concept order, so the row order of items.tsv reveals nothing.
    item_concept = rng.permutation(np.repeat(np.arange(config.num_concepts), per_concept))
    rank = np.empty(len(item_concept), dtype=np.int64)  # popularity rank within the concept, 1 = most popular
    for k in range(config.num_concepts):
        members = np.flatnonzero(item_concept == k)
        rank[members] = rng.permutation(len(members)) + 1
    zipf_weights = rank.astype(np.float64) ** -config.zipf
    category, style = np.divmod(item_concept, config.num_styles)
    item_ids = [f"{prefix}{i + 1}" for i in range(len(item_concept))]
    titles = [_title(rng, int(category[i]), int(style[i]), profile, config) for i in range(len(item_ids))]
    sequences, noise_clicks, dead_ends = _simulate_users(
        np.random.default_rng([config.seed, 1, index, 1]), n_users, item_concept, next_ids, next_probs,
        zipf_weights, config, desc=f"users {name}")
    user_ids = [f"{prefix}u{u + 1}" for u in range(n_users)]
    formats = {"PNG": 0, "JPEG": 0}

    def images():
        styles, shape_kinds = list(STYLES.values()), config.num_categories
        for i in tqdm(range(len(item_ids)), desc=f"images {name}", disable=config.quick or None, leave=False):
            image_rng = np.random.default_rng([config.seed, 1, index, 2, i])
            data, fmt = draw_image(image_rng, int(category[i]), shape_kinds, styles[int(style[i])], profile,
                                   config.image_size, config.shape_fidelity, config.pixel_noise,
                                   config.jpeg_fraction)
            formats[fmt] += 1
            yield item_ids[i], data

    with atomic_dir(world / name) as tmp:
        write_domain_tables(tmp, item_ids, titles, user_ids, [[item_ids[i] for i in s] for s in sequences])
        write_image_db(tmp / IMAGES_DB, images())
    category_names, style_names = list(CATEGORIES), list(STYLES)
    truth = ["item_id\tconcept\tcategory\tstyle\tcategory_name\tstyle_name\tpopularity_rank"]
    truth += [f"{iid}\t{item_concept[i]}\t{category[i]}\t{style[i]}\t{category_names[category[i]]}\t"
              f"{style_names[style[i]]}\t{rank[i]}" for i, iid in enumerate(item_ids)]
    atomic_write_text(world / TRUTH_DIR / f"{name}.tsv", "\n".join(truth) + "\n")
    summary = DomainSummary(name, role, len(item_ids), n_users, sum(map(len, sequences)), noise_clicks,
                            dead_ends)
    entry = {**asdict(summary), "folder": name, "item_prefix": prefix, "profile": profile.name,
             "truth": f"{TRUTH_DIR}/{name}.tsv", "png": formats["PNG"], "jpeg": formats["JPEG"]}
    logger.info("domain %s (%s): %d items, %d users, %d clicks (%d noise, %d dead ends)", name, role,
                summary.num_items, n_users, summary.num_interactions, noise_clicks, dead_ends)
    return summary, entry


def read_world(path: str | Path) -> dict:
    """The metadata (world.json) of a world written by ``synthesize_world``."""
    file = Path(path) / WORLD_FILE
    if not file.is_file():
        raise DataError(f"not a synthetic world (no {WORLD_FILE})", path)
    return json.loads(file.read_text(encoding="utf-8"))


def read_item_concepts(path: str | Path, domain: str) -> dict[str, tuple[int, int]]:
    """Ground truth of one domain of a world: item id -> (category, style)."""
    file = Path(path) / TRUTH_DIR / f"{domain}.tsv"
    if not file.is_file():
        raise DataError(f"no ground truth for domain {domain!r}", file)
    rows = [line.split("\t") for line in file.read_text(encoding="utf-8").splitlines()[1:]]
    return {r[0]: (int(r[2]), int(r[3])) for r in rows}
