"""The cold-start promise: an item added after training, by title and image only, is recommended for histories of
its own concept, and far above new items of other concepts.

The world is the built-in generator with users who mostly stay within a concept (``stay=0.9``), so "a history of
concept c" has a known right answer: more of concept c. (In the default world the next concept is usually a
*different* one, following the shared chain, which a model trained for seconds only begins to learn.) New items
are drawn exactly as the generator draws its items, from seeds the world never used.
"""

from pathlib import Path

import numpy as np
import pytest

from pmmrec import NewItem, Recommender
from pmmrec.config import load_config
from pmmrec.data.synth import SynthConfig, _title, read_item_concepts, synthesize_world
from pmmrec.data.synth_assets import PROFILES, STYLES, draw_image
from pmmrec.training.api import fit

REPO = Path(__file__).resolve().parents[3]
WORLD = SynthConfig(seed=0, quick=True, num_categories=4, num_styles=2, items_per_concept=6,
                    target_items_per_concept=6, stay=0.9, next_concepts=1, sources=("books",), target_users=120)


def new_item(item_id: str, concept: int, seed: int) -> NewItem:
    category, style = divmod(concept, WORLD.num_styles)
    rng = np.random.default_rng([1000, concept, seed])  # the world's own draws use [seed=0, 1, domain, ...]
    profile = PROFILES["food"]  # the target domain's look
    image, _ = draw_image(rng, category, WORLD.num_categories, list(STYLES.values())[style], profile,
                          WORLD.image_size, WORLD.shape_fidelity, WORLD.pixel_noise, WORLD.jpeg_fraction)
    return NewItem(item_id, title=_title(rng, category, style, profile, WORLD), image=image)


@pytest.mark.slow
def test_new_items_are_recommended_for_histories_of_their_concept(tmp_path):
    world = tmp_path / "world"
    synthesize_world(world, WORLD)
    # One window per user (train.windows=last): the 2-epoch budget this check was calibrated with. With every
    # window (the default) the tiny model put 0.375 of the new items in the top quarter at 2 epochs, not 0.5.
    config = load_config(REPO / "configs" / "tiny.yaml", [
        f"data.domain={world / 'target'}", f"run.dir={tmp_path / 'run'}", "train.epochs=2", "model.fusion=sum", "train.windows=last"])
    fit(config)
    rec = Recommender.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    concepts = range(WORLD.num_concepts)
    new = [new_item(f"new{c}_{r}", c, r) for c in concepts for r in range(2)]
    rec.add_items(new)
    assert len(rec) == WORLD.num_concepts * 6 + len(new)

    truth = read_item_concepts(world, "target")
    matched, mismatched, in_top = [], [], []
    top = len(rec) // 4  # 16 of 64
    for c in concepts:
        members = sorted(i for i, (cat, style) in truth.items() if cat * WORLD.num_styles + style == c)
        for h in range(3):
            history = list(np.random.default_rng([c, h]).choice(members, 3, replace=False))
            rank = {r.item_id: n for n, r in enumerate(rec.recommend(history, k=len(rec)))}
            mine = [rank[f"new{c}_{r}"] for r in range(2)]
            others = [rank[item.item_id] for item in new if not item.item_id.startswith(f"new{c}_")]
            matched.append(np.mean(mine))
            mismatched.append(np.mean(others))
            in_top += [x < top for x in mine]
    matched, mismatched = np.array(matched), np.array(mismatched)
    # Measured (seed 0): matched mean rank 10.8 of 61 candidates, mismatched 29.3 (a random item's expected rank
    # is about 30); matched ahead in 24/24 histories; 67% of matched new items in the top 16.
    assert (matched < mismatched).mean() >= 0.8
    assert matched.mean() < 0.6 * mismatched.mean()
    assert np.mean(in_top) >= 0.5
