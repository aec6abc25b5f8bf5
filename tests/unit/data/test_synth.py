"""The built-in world (docs/design.md §10): valid domain folders, determinism, and the designed structure.

The structure tests are the point: titles must reveal category far better than style, images the reverse,
and every domain must follow the same concept chain, with some noise clicks off it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re

import lmdb
import numpy as np
import pytest
from PIL import Image

from pmmrec.data.domain import read_domain
from pmmrec.data.synth import (
    SynthConfig,
    read_item_concepts,
    read_world,
    synthesize_world,
    transition_matrix,
)
from pmmrec.errors import ConfigError, PmmrecError

DOMAINS = ("books", "films", "games", "target")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "world"
    summary = synthesize_world(out, SynthConfig(seed=3, quick=True))
    return out, summary


def _images(path) -> dict[str, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(k).decode(): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def _digest(out) -> str:
    """One hash over every table, the ground truth, world.json and every image value, in a fixed order."""
    h = hashlib.sha256()
    for name in [d["name"] for d in read_world(out)["domains"]]:
        for file in ("items.tsv", "users.tsv"):
            h.update((out / name / file).read_bytes())
        h.update((out / "truth" / f"{name}.tsv").read_bytes())
        for key, value in sorted(_images(out / name / "images.lmdb").items()):
            h.update(key.encode() + b"\0" + value)
    h.update((out / "world.json").read_bytes())
    return h.hexdigest()


def test_domains_read_back_valid(world):
    out, summary = world
    assert [d.name for d in summary.domains] == list(DOMAINS)
    for entry in summary.domains:
        domain = read_domain(out / entry.name, missing_image="error")
        assert (domain.num_items, domain.num_users, domain.num_interactions) == (
            entry.num_items, entry.num_users, entry.num_interactions)
        lengths = [len(s) for s in domain.sequences]
        assert min(lengths) >= 5 and max(lengths) <= 40
        assert all(len(set(s.tolist())) == len(s) for s in domain.sequences)  # no item clicked twice
        assert not domain.dropped


def test_domains_disjoint_and_target_small(world):
    out, summary = world
    items = {d: read_domain(out / d).item_ids for d in DOMAINS}
    assert len(set().union(*items.values())) == sum(len(v) for v in items.values())
    users = {d.name: d.num_users for d in summary.domains}
    assert all(users["target"] < users[s] for s in DOMAINS[:3])
    meta = read_world(out)
    assert [d["role"] for d in meta["domains"]] == ["source"] * 3 + ["target"]
    assert meta["seed"] == 3 and meta["config"]["quick"] is True
    for name in DOMAINS:  # ground truth covers every item and stays out of items.tsv
        assert set(read_item_concepts(out, name)) == set(items[name])
        assert "concept" not in (out / name / "items.tsv").read_text()


def test_images_decode_in_both_formats(world):
    out, _ = world
    formats = set()
    for name in DOMAINS:
        for data in _images(out / name / "images.lmdb").values():
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                formats.add(img.format)
                assert img.size == (64, 64) and img.mode == "RGB"
    assert formats == {"PNG", "JPEG"}


def test_same_seed_same_bytes(world, tmp_path):
    out, _ = world
    synthesize_world(tmp_path / "again", SynthConfig(seed=3, quick=True))
    synthesize_world(tmp_path / "other", SynthConfig(seed=4, quick=True, sources=("books",)))
    assert _digest(tmp_path / "again") == _digest(out)
    for file in ("items.tsv", "users.tsv"):  # another seed gives another world
        assert (tmp_path / "other" / "books" / file).read_bytes() != (out / "books" / file).read_bytes()


def test_existing_output_needs_overwrite(tmp_path):
    config = SynthConfig(quick=True, sources=("books",), source_users=5, target_users=3)
    synthesize_world(tmp_path / "w", config)
    with pytest.raises(PmmrecError, match="already exists"):
        synthesize_world(tmp_path / "w", config)
    summary = synthesize_world(tmp_path / "w", SynthConfig(quick=True, sources=("films",), source_users=5,
                                                            target_users=3), overwrite=True)
    assert [d.name for d in summary.domains] == ["films", "target"]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["films", "target", "truth", "world.json"]


def test_config_sizes_and_validation():
    quick, full = SynthConfig(quick=True), SynthConfig()
    assert quick.source_users < full.source_users and quick.items_per_concept < full.items_per_concept
    assert SynthConfig(quick=True, source_users=7).source_users == 7  # an explicit size wins over quick
    for bad in ({"noise": 1.0}, {"sources": ()}, {"sources": ("books", "books")}, {"target": "Bad Name"},
                {"sources": ("truth",)}, {"num_categories": 99}, {"min_len": 41}, {"items_per_concept": 0}):
        with pytest.raises(ConfigError):
            SynthConfig(**bad)


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray,
                               cosine: bool = False) -> float:
    """Fit one centroid per class on the train rows; accuracy of the nearest centroid on the other rows.

    ``cosine`` compares directions (the usual choice for bags of words), else Euclidean distances.
    """
    classes = np.unique(y[train])
    centroids = np.stack([x[train & (y == c)].mean(axis=0) for c in classes])  # (K, F)
    if cosine:
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        nearest = (x[~train] @ centroids.T).argmax(1)  # rows of x are unit vectors
    else:
        nearest = ((x[~train, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)  # from (N_test, K)
    return float((classes[nearest] == y[~train]).mean())


def _above_chance(accuracy: float, classes: int) -> float:
    """Accuracy rescaled so chance is 0 and perfect is 1 (12 categories and 4 styles differ in chance)."""
    return (accuracy - 1 / classes) / (1 - 1 / classes)


def test_title_reveals_category_and_image_reveals_style(world):
    out, _ = world
    titles, features, labels = [], [], []
    for name in DOMAINS:
        domain, truth, images = read_domain(out / name), read_item_concepts(out, name), _images(
            out / name / "images.lmdb")
        for item_id, title in zip(domain.item_ids, domain.titles, strict=True):
            titles.append(re.findall(r"[a-z]+", title.lower()))
            with Image.open(io.BytesIO(images[item_id])) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.float64) / 255  # (H, W, 3)
            hist = [np.histogram(pixels[..., ch], bins=4, range=(0, 1))[0] / pixels[..., ch].size
                    for ch in range(3)]
            features.append(np.concatenate([pixels.mean((0, 1)), pixels.std((0, 1)), *hist]))
            labels.append(truth[item_id])
    category, style = np.array(labels).T
    vocab = {w: i for i, w in enumerate(sorted({w for t in titles for w in t}))}
    bow = np.zeros((len(titles), len(vocab)))
    for row, words in enumerate(titles):
        for w in words:
            bow[row, vocab[w]] += 1
    bow /= np.linalg.norm(bow, axis=1, keepdims=True)
    colour = np.array(features)
    train = np.random.default_rng(0).random(len(titles)) < 0.7
    colour = (colour - colour[train].mean(0)) / (colour[train].std(0) + 1e-9)

    text_cat = _above_chance(_nearest_centroid_accuracy(bow, category, train, cosine=True), 12)
    text_style = _above_chance(_nearest_centroid_accuracy(bow, style, train, cosine=True), 4)
    image_cat = _above_chance(_nearest_centroid_accuracy(colour, category, train), 12)
    image_style = _above_chance(_nearest_centroid_accuracy(colour, style, train), 4)
    # Measured at seed 3: text 0.78 (category) vs 0.21 (style), colour -0.07 vs 1.00. The quick world's ~270
    # training titles bound a bag-of-words classifier well below the 0.95 a reader who knows the pools gets.
    assert text_cat > 0.6 and image_style > 0.8  # the strong signals
    assert text_cat - text_style > 0.3 and image_style - image_cat > 0.3
    assert text_style > 0.05  # the title still reveals the style, weakly


def _concept_pairs(out, name: str) -> tuple[np.ndarray, int]:
    """Counts of consecutive (concept, next concept) clicks in one domain, (C, C), and C."""
    truth, meta = read_item_concepts(out, name), read_world(out)
    num_styles = len(meta["styles"])
    c = len(meta["categories"]) * num_styles
    concept = {iid: cat * num_styles + sty for iid, (cat, sty) in truth.items()}
    counts = np.zeros((c, c))
    for line in (out / name / "users.tsv").read_text().splitlines()[1:]:
        seq = [concept[i] for i in line.split("\t")[1].split()]
        np.add.at(counts, (seq[:-1], seq[1:]), 1)
    return counts, c


def _true_transitions(out) -> np.ndarray:
    rows = read_world(out)["transitions"]
    ids, probs = np.array([[n for n, _ in r] for r in rows]), np.array([[p for _, p in r] for r in rows])
    return transition_matrix(ids, probs)


def test_transitions_shared_across_domains_with_noise(world):
    out, _ = world
    truth = _true_transitions(out)
    books, _ = _concept_pairs(out, "books")
    films, _ = _concept_pairs(out, "films")
    assert np.corrcoef(books.ravel(), films.ravel())[0, 1] > 0.8
    assert np.corrcoef(books.ravel(), truth.ravel())[0, 1] > 0.8
    assert ((truth > 0).sum(1) <= 4).all()  # sparse: stay + 3 likely next concepts
    off_chain = books[truth == 0].sum() / books.sum()
    assert 0.05 < off_chain < 0.35  # noise clicks (10%) break the chain on both sides
    assert all(d["noise_clicks"] > 0 for d in json.loads((out / "world.json").read_text())["domains"])


def test_without_noise_users_follow_the_chain(tmp_path):
    out = tmp_path / "clean"
    summary = synthesize_world(out, SynthConfig(seed=1, quick=True, noise=0.0, sources=("books",)))
    counts, _ = _concept_pairs(out, "books")
    off_chain = counts[_true_transitions(out) == 0].sum()
    assert summary.domains[0].noise_clicks == 0
    assert off_chain <= summary.domains[0].dead_ends  # only a used-up chain may jump
