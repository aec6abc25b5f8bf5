"""``pmmrec demo`` (what ``make demo`` runs): the built-in world, end to end as far as the product goes today.

It synthesises the multi-domain world (DESIGN section 10), reads every domain back through the validating
reader, builds the item feature store of the target domain with the default encoders' tokenizer and image
preprocessing (real LMDB reads, real decoding), and writes ``report.md`` plus the resolved ``config.yaml``
into the demo folder. Training, transfer and the results table join it as the later issues land.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from pmmrec.config import Config, dump_config, load_config
from pmmrec.data.domain import read_domain
from pmmrec.data.images import ImagePreprocessor
from pmmrec.data.item_features import ItemFeatureStore, image_refs_of
from pmmrec.data.stats import domain_stats, format_stats
from pmmrec.data.synth import SynthConfig, read_world, synthesize_world
from pmmrec.pretrained import tokenizer_dir
from pmmrec.utils.io import atomic_write_text

log = logging.getLogger(__name__)


def demo_config(world: Path, run_dir: Path) -> Config:
    """The default recipe pointed at the built-in world: sources for pretraining, ``target`` for transfer."""
    domains = read_world(world)["domains"]
    sources = [(world / d["folder"]).as_posix() for d in domains if d["role"] == "source"]
    target = next((world / d["folder"]).as_posix() for d in domains if d["role"] == "target")
    return load_config(None, [f"data.sources=[{', '.join(sources)}]", f"data.domain={target}",
                              f"run.dir={run_dir.as_posix()}"])


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, overwrite: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    t0 = time.perf_counter()
    synthesize_world(world, SynthConfig(seed=seed, quick=quick), overwrite=overwrite)
    synth_s = time.perf_counter() - t0
    config = demo_config(world, out)
    dump_config(config, out / "config.yaml")

    sections = []
    for folder in (world / d["folder"] for d in read_world(world)["domains"]):
        domain = read_domain(folder, empty_title=config.data.empty_title, missing_image=config.data.missing_image)
        stats = domain_stats(domain)
        sections.append((folder.name, stats))
        print(f"\n== {folder.name} ==\n{format_stats(stats)}")

    # The target's item inputs as training will consume them: MiniLM token ids and preprocessed images.
    target = read_domain(world / "target", missing_image=config.data.missing_image)
    t0 = time.perf_counter()
    store = ItemFeatureStore.build(target.titles, image_refs_of(target), tokenizer_path=tokenizer_dir(config.text.encoder),
                                   max_tokens=config.text.max_tokens, lowercase=config.text.lowercase,
                                   preprocessor=ImagePreprocessor.efficientnet_lite(),
                                   missing_image=config.data.missing_image, cache_dir=out / "cache")
    inputs = store.lookup(np.arange(1, target.num_items + 1))
    features_s = time.perf_counter() - t0
    lengths = inputs.text_mask.sum(1).float()
    feature_line = (f"target item features: {len(inputs)} items, title tokens mean {lengths.mean():.1f} / max "
                    f"{int(lengths.max())}, images {tuple(inputs.images.shape[1:])} "
                    f"(all present: {bool(inputs.has_image.all())}), built in {features_s:.1f}s")
    print(f"\n{feature_line}\nworld synthesised in {synth_s:.1f}s under {world}")

    lines = ["# pmmrec demo", "", f"Built-in world (seed {seed}{', quick' if quick else ''}) synthesised in "
             f"{synth_s:.1f}s under `{world}`.", ""]
    for name, stats in sections:
        lines += [f"## {name}", "", "```", format_stats(stats), "```", ""]
    lines += ["## Item features", "", feature_line, "",
              "Training, transfer and the results table are added to this report by later releases.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    log.info("wrote %s", out / "report.md")
    return out
