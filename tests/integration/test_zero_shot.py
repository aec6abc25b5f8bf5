"""Zero-shot transfer: a content checkpoint trained on one domain ranks another domain's catalogue, untouched.

``pmmrec evaluate --checkpoint CKPT data.domain=OTHER`` and ``Recommender.from_checkpoint(CKPT, OTHER)`` encode
the other domain's items by their titles and images alone; an ID checkpoint cannot; and a model that reads
images refuses a catalogue without them, naming how many items lack one and which, unless
``data.missing_image=blank``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import png_bytes

from pmmrec.cli import main
from pmmrec.config import load_config
from pmmrec.data.domain import read_domain, write_domain_tables
from pmmrec.data.image_db import write_image_db
from pmmrec.errors import PmmrecError
from pmmrec.evaluation.checkpoint import evaluate_checkpoint
from pmmrec.inference import Recommender
from pmmrec.training.api import fit

REPO = Path(__file__).resolve().parents[2]
WORDS = ["red", "green", "blue", "sun", "sea", "ship", "pie", "tea", "bird", "tree", "rock", "song"]


def _domain(root: Path, name: str, prefix: str, num_items: int, num_users: int, seed: int,
            images: list[int] | None = None) -> Path:
    """A small domain: items ``<prefix>1..`` with two-word titles, users with 4-7 interactions each, and images
    for the items at ``images`` (positions; default: all)."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir()
    ids = [f"{prefix}{k}" for k in range(1, num_items + 1)]
    titles = [f"{rng.choice(WORDS)} {rng.choice(WORDS)}" for _ in ids]
    users = [[rng.choice(ids) for _ in range(rng.randint(4, 7))] for _ in range(num_users)]
    write_domain_tables(folder, ids, titles, [f"{prefix}u{k}" for k in range(num_users)], users)
    keep = range(num_items) if images is None else images
    write_image_db(folder / "images.lmdb",
                   [(ids[k], png_bytes((rng.randrange(256), rng.randrange(256), rng.randrange(256)))) for k in keep])
    return folder


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    """``source`` (12 items) to train on; ``other``, a different catalogue (7 items, other ids); ``no_images``, the
    same tables with no image database; ``some_images``, with images for 5 of the 7 items."""
    root = tmp_path_factory.mktemp("zero-shot")
    other = _domain(root, "other", "b", 7, 9, seed=2)
    no_images = root / "no_images"
    no_images.mkdir()
    for name in ("items.tsv", "users.tsv"):
        shutil.copy(other / name, no_images / name)
    return {"source": _domain(root, "source", "a", 12, 10, seed=1), "other": other, "no_images": no_images,
            "some_images": _domain(root, "some_images", "b", 7, 9, seed=2, images=[0, 2, 3, 5, 6])}


def _train(domain: Path, run: Path, *overrides: str) -> Path:
    fit(load_config(REPO / "configs" / "tiny.yaml", [f"data.domain={domain}", f"run.dir={run}", "train.epochs=1",
                                                     "train.max_steps=2", *overrides]))
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def multimodal(domains, tmp_path_factory) -> Path:
    """A content checkpoint (titles and images, the tiny recipe's default) trained on ``source`` only."""
    return _train(domains["source"], tmp_path_factory.mktemp("run") / "mm")


def _reference_metrics(rec: Recommender, domain: Path, ks=(5, 10, 20)) -> dict:
    """Test-split metrics computed by hand over ``domain``'s catalogue: each user's last item ranked (ties
    against it) among all the catalogue's items, or among those outside the user's history."""
    d = read_domain(domain)
    ids, vectors = rec.item_vectors()
    assert ids == d.item_ids  # the catalogue is the other domain's, in its order
    ranks = {"exclude_history": [], "include_history": []}
    for seq in d.sequences:
        history, target = [d.item_ids[i - 1] for i in seq[:-1]], d.item_ids[seq[-1] - 1]
        scores = vectors @ rec.encode_user(history).numpy()  # (N,)
        t = ids.index(target)
        beats = scores >= scores[t]
        beats[t] = False
        ranks["include_history"].append(int(beats.sum()))
        beats[[ids.index(i) for i in history]] = False
        ranks["exclude_history"].append(int(beats.sum()))
    out = {}
    for protocol, rs in ranks.items():
        rs = np.array(rs)
        out[protocol] = {}
        for k in ks:
            hit = rs < k
            out[protocol][f"HR@{k}"] = float(hit.mean())
            out[protocol][f"NDCG@{k}"] = float(np.where(hit, 1 / np.log2(rs + 2), 0).mean())
            out[protocol][f"MRR@{k}"] = float(np.where(hit, 1 / (rs + 1), 0).mean())
    return out


def test_a_content_checkpoint_ranks_another_domains_catalogue(multimodal, domains, capsys):
    other = domains["other"]
    # The whole encoder runs at every call (no frozen-prefix cache), as in the Recommender: same arithmetic.
    overrides = [f"data.domain={other}", "train.feature_cache=false"]
    results = evaluate_checkpoint(str(multimodal), overrides, splits=["test"])
    rec = Recommender.from_checkpoint(multimodal, other)
    reference = _reference_metrics(rec, other)
    for protocol, metrics in reference.items():
        assert results["test"][protocol] == pytest.approx(metrics, abs=1e-9), protocol
    # Seven items: any target is in the top 10 of this catalogue (it may not be in the 12-item source's).
    assert results["test"]["include_history"]["HR@10"] == 1.0

    assert main(["evaluate", "--checkpoint", str(multimodal), "--json", "--split", "test", *overrides]) == 0
    assert json.loads(capsys.readouterr().out) == results


def test_the_recommender_serves_another_domains_catalogue(multimodal, domains):
    other = read_domain(domains["other"])
    rec = Recommender.from_checkpoint(multimodal, domains["other"])
    assert len(rec) == other.num_items and rec.domain == domains["other"]
    assert rec.item("b3").title == other.titles[2] and rec.item("a3") is None
    history = [other.item_ids[i - 1] for i in other.sequences[0]]
    recs = rec.recommend(history, k=20)
    assert {r.item_id for r in recs} == set(other.item_ids) - set(history)


@pytest.mark.parametrize("folder, message", [
    ("no_images", r"no_images: no image database \(images.lmdb\), so none of its 7 items has an image "
                  r"\('b1', 'b2', 'b3', 'b4', 'b5' and 2 more\)"),
    ("some_images", r"2 of 7 items have no image: 'b2', 'b5'"),
])
def test_an_image_model_names_the_items_without_an_image(multimodal, domains, folder, message, capsys):
    domain = domains[folder]
    for load in (lambda *o: evaluate_checkpoint(str(multimodal), [f"data.domain={domain}", *o], splits=["test"]),
                 lambda *o: Recommender.from_checkpoint(multimodal, domain, overrides=o)):
        with pytest.raises(PmmrecError, match=message) as e:
            load()
        assert "model.modality" in str(e.value) and "set data.missing_image: blank" in str(e.value)
        assert load("data.missing_image=blank") is not None  # blank images for them, as asked
    assert main(["evaluate", "--checkpoint", str(multimodal), f"data.domain={domain}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmmrec: error: ") and err.strip().count("\n") == 0 and re.search(message, err)


def test_a_text_model_needs_no_images(domains, tmp_path):
    ckpt = _train(domains["source"], tmp_path / "text", "model.modality=text")
    results = evaluate_checkpoint(str(ckpt), [f"data.domain={domains['no_images']}"], splits=["test"])
    assert 0.0 < results["test"]["exclude_history"]["NDCG@10"] <= 1.0
    assert len(Recommender.from_checkpoint(ckpt, domains["no_images"])) == 7


def test_an_id_checkpoint_refuses_another_catalogue(domains, tmp_path):
    ckpt = _train(domains["source"], tmp_path / "id", "model.item_tower=id")
    with pytest.raises(PmmrecError, match="an ID-based model can only be evaluated on the catalogue it was trained"):
        evaluate_checkpoint(str(ckpt), [f"data.domain={domains['other']}"])


def test_evaluate_out_writes_a_zero_shot_run_folder_for_report(multimodal, domains, tmp_path, capsys):
    other, out = domains["other"], tmp_path / "zero-shot"
    assert main(["evaluate", "--checkpoint", str(multimodal), "--out", str(out), f"data.domain={other}"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["evaluated"]["zero_shot"] is True and results["evaluated"]["domain"] == str(other)
    assert results["num_users"] == 9 and results["num_items"] == 7 and "valid" in results and "test" in results
    assert (out / "config.yaml").is_file()
    assert main(["report", "--curve", str(out)]) == 0
    assert "| multimodal, zero-shot |" in capsys.readouterr().out
    # The same checkpoint on its own domain is an evaluation, not zero-shot; an --out holding results is refused.
    own = tmp_path / "own"
    evaluate_checkpoint(str(multimodal), [], out=own)
    assert json.loads((own / "results.json").read_text())["evaluated"]["zero_shot"] is False
    with pytest.raises(PmmrecError, match="already holds results.json"):
        evaluate_checkpoint(str(multimodal), [], out=own)
