"""``pmmrec demo`` (what ``make demo`` runs): the built-in world, end to end, on one CPU machine.

docs/design.md §10. It synthesises the multi-domain world, pretrains PMMRec on the three source domains (all four
objectives, plus the two ablations rec-only and rec+NICL), then on the target domain, whose items were never
seen: transfers the pretrained model by part (full, item encoder, user encoder) and by modality (multimodal, text,
vision), trains from scratch (multimodal PMMRec and the ID-based SASRec) and adds a most-popular baseline.
Everything is evaluated with full ranking and written as ``report.md`` / ``report.json`` / ``report.png``
(one table with the gain against PMMRec trained from scratch).

The CPU recipe keeps the default pretrained encoders frozen, so their outputs are computed once per item and
shared by every run through ``train.cache_dir`` (docs/design.md §9).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pmmrec.config import Config, load_config
from pmmrec.data.domain import read_domain
from pmmrec.data.sources import eval_splits, load_sources, load_split
from pmmrec.data.stats import domain_stats, format_stats
from pmmrec.data.synth import SynthConfig, read_world, synthesize_world
from pmmrec.evaluation.baselines import most_popular
from pmmrec.models.loading import read_checkpoint
from pmmrec.report import add_gains, format_table, make_row, write_report
from pmmrec.training import fit
from pmmrec.training.transfer import transfer_config

log = logging.getLogger(__name__)

# The CPU recipe (identical to configs/cpu.yaml, which a test checks): the default pretrained encoders, fully
# frozen so their outputs are computed once per item; projections, fusion and SASRec train.
CPU_RECIPE = [
    "text.encoder=minilm", "text.max_tokens=32", "text.trainable_layers=0",
    "vision.encoder=efficientnet-lite0", "vision.trainable_layers=0", "vision.image_size=128",
    "model.dim=64", "model.fusion=merged_attention",
    "train.epochs=30", "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=20", "train.patience=5",
    "train.deterministic=true",
]
QUICK = ["train.epochs=8", "train.patience=8"]
# Pretraining on the sources (thousands of users): a fixed budget of epochs.
PRETRAIN = ["train.epochs=3", "train.patience=3", "train.warmup_steps=40"]
PRETRAIN_QUICK = ["train.epochs=4", "train.patience=4"]
PRETRAININGS = {  # name -> objectives; "all" is the PMMRec model, the others are the ablation
    "all": ("rec", "nicl", "nid", "rcl"),
    "rec": ("rec",),
    "rec+nicl": ("rec", "nicl"),
}
MAIN, ABLATION = "target domain", "ablation: pretraining objectives (full multimodal transfer)"
SCRATCH = "PMMRec multimodal, scratch"  # the reference of the gain column
FULL_TRANSFER = "transfer-full"  # the run folder of the full multimodal transfer (also the ablation's "all four")


@dataclass(frozen=True)
class Variant:
    name: str
    folder: str  # under <out>/runs/
    overrides: tuple[str, ...] = ()
    pretrained: str | None = None  # a PRETRAININGS key: transfer from that pretraining's best checkpoint
    group: str = MAIN


VARIANTS = [
    Variant(SCRATCH, "scratch"),
    Variant("SASRec (item IDs), scratch", "scratch-ids", ("model.item_tower=id",)),
    Variant("transfer full, multimodal", FULL_TRANSFER, ("transfer.parts=full",), "all"),
    Variant("transfer item encoder, multimodal", "transfer-item", ("transfer.parts=item_encoder",), "all"),
    Variant("transfer user encoder, multimodal", "transfer-user", ("transfer.parts=user_encoder",), "all"),
    Variant("transfer full, text only", "transfer-text", ("transfer.parts=full", "model.modality=text"), "all"),
    Variant("transfer full, vision only", "transfer-vision", ("transfer.parts=full", "model.modality=vision"),
            "all"),
    Variant("pretrained with rec", "ablation-rec", ("transfer.parts=full",), "rec", ABLATION),
    Variant("pretrained with rec + NICL", "ablation-rec-nicl", ("transfer.parts=full",), "rec+nicl", ABLATION),
]


def world_domains(world: Path) -> tuple[list[str], str]:
    """The source domain folders and the target domain folder of a synthesised world."""
    domains = read_world(world)["domains"]
    sources = [(world / d["folder"]).as_posix() for d in domains if d["role"] == "source"]
    target = next((world / d["folder"]).as_posix() for d in domains if d["role"] == "target")
    return sources, target


def _common(world: Path, run_dir: Path, quick: bool, seed: int, cache_dir: Path | None) -> list[str]:
    sources, target = world_domains(world)
    return [*CPU_RECIPE, *(QUICK if quick else []), f"data.sources=[{', '.join(sources)}]",
            f"data.domain={target}", f"run.dir={run_dir.as_posix()}", f"seed={seed}",
            *([f"train.cache_dir={cache_dir.as_posix()}"] if cache_dir is not None else [])]


def demo_config(world: Path, run_dir: Path, quick: bool = False, seed: int = 0,
                overrides: list[str] | tuple[str, ...] = (), cache_dir: Path | None = None) -> Config:
    """The CPU recipe pointed at the built-in world (sources for pretraining, ``target`` for training),
    plus a variant's ``overrides``."""
    return load_config(None, [*_common(world, run_dir, quick, seed, cache_dir), *overrides])


def pretrain_config(world: Path, run_dir: Path, objectives: tuple[str, ...], quick: bool = False, seed: int = 0,
                    cache_dir: Path | None = None) -> Config:
    """The demo's pretraining on the world's source domains with ``objectives``."""
    return demo_config(world, run_dir, quick, seed, [*PRETRAIN, *(PRETRAIN_QUICK if quick else []),
                                                     f"objectives.use=[{', '.join(objectives)}]"], cache_dir)


def transfer_demo_config(world: Path, run_dir: Path, checkpoint: Path, quick: bool = False, seed: int = 0,
                         overrides: list[str] | tuple[str, ...] = (), cache_dir: Path | None = None) -> Config:
    """A target run initialised from ``checkpoint`` (architecture from the checkpoint, then the recipe)."""
    return transfer_config(read_checkpoint(checkpoint).state, None,
                           [*_common(world, run_dir, quick, seed, cache_dir),
                            f"transfer.checkpoint={checkpoint.as_posix()}", *overrides], str(checkpoint))


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, overwrite: bool = True,
             ablation: bool = True) -> list[dict]:
    """Run everything and write the report into ``out``; returns the table's rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world, runs, cache = out / "world", out / "runs", out / "cache"
    started = time.perf_counter()
    summary = synthesize_world(world, SynthConfig(seed=seed, quick=quick), overwrite=overwrite)
    print(summary.format())
    sections = []
    for entry in read_world(world)["domains"]:
        stats = domain_stats(read_domain(world / entry["folder"], missing_image="error"))
        sections += [f"## {entry['name']}", "", "```", format_stats(stats), "```", ""]
    if runs.exists() and overwrite:
        shutil.rmtree(runs)  # the demo always starts its runs afresh

    # Pretraining on the sources: the PMMRec model (all four objectives) and the ablations.
    variants = [v for v in VARIANTS if ablation or v.group != ABLATION]
    wanted = [name for name in PRETRAININGS if any(v.pretrained == name for v in variants)]
    checkpoints, pretrain_rows = {}, []
    source_split = None
    for name in wanted:
        config = pretrain_config(world, runs / f"pretrain-{name.replace('+', '-')}", PRETRAININGS[name], quick,
                                 seed, cache)
        if source_split is None:
            source_split = load_sources(config)  # read once, shared by every pretraining
        print(f"pretraining on the sources with {' + '.join(PRETRAININGS[name])} ...", flush=True)
        t0 = time.perf_counter()
        results = fit(config, split=source_split[0], views=source_split[1])
        took = time.perf_counter() - t0
        checkpoints[name] = Path(config.run.dir) / "checkpoints" / "best.pt"
        pretrain_rows.append((name, results, took))

    # The target domain: baselines, scratch and transfers.
    base = demo_config(world, runs / "unused", quick, seed)
    split = load_split(base)  # read once, shared by every variant
    _, test = eval_splits(split, base.data.max_seq_len)
    rows = [make_row("most popular", {"test": most_popular(split.train_counts, test, base.eval.ks)}, group=MAIN)]
    for variant in variants:
        run_dir = runs / variant.folder
        if variant.pretrained is None:
            config = demo_config(world, run_dir, quick, seed, variant.overrides, cache)
        else:
            config = transfer_demo_config(world, run_dir, checkpoints[variant.pretrained], quick, seed,
                                          variant.overrides, cache)
        print(f"training {variant.name} ...", flush=True)
        t0 = time.perf_counter()
        init = None if variant.pretrained is None else str(checkpoints[variant.pretrained])
        results = fit(config, split=split, init=init)
        rows.append(make_row(variant.name, results, time.perf_counter() - t0, variant.group, run_dir))
    if ablation:  # the ablation's last line is the full multimodal transfer above, repeated
        full = next(r for r in rows if r["run"] == str(runs / FULL_TRANSFER))
        rows.append(dict(full, name="pretrained with all four (PMMRec)", group=ABLATION, seconds=None))
    add_gains(rows, next(r for r in rows if r["name"] == SCRATCH))

    total = time.perf_counter() - started
    table = format_table(rows)
    print(f"\n{table}\n\n(test split; HR/NDCG@10 under exclude_history unless marked; {total:.0f}s in all)")
    pretrain_lines = ["## Pretraining on the source domains", "",
                      "| objectives | mean source NDCG@10 (test) | steps | time |", "|---|---|---|---|"]
    for name, results, took in pretrain_rows:
        pretrain_lines.append(f"| {' + '.join(PRETRAININGS[name])} | "
                              f"{results['test']['exclude_history']['NDCG@10']:.4f} | {results['steps']} | "
                              f"{took:.0f}s |")
    intro = [f"Built-in world (seed {seed}{', quick' if quick else ''}). Target domain: items never seen in "
             "pretraining; full ranking over every target item; test split.",
             "Gain: relative NDCG@10 (exclude_history) against PMMRec trained from scratch on the target.",
             f"Total time {total:.0f}s on this machine."]
    write_report(out, rows, "pmmrec demo", intro, sections=[*pretrain_lines, "", *sections],
                 extra={"seed": seed, "quick": quick, "seconds": round(total, 1),
                        "pretraining": [{"objectives": list(PRETRAININGS[name]), "steps": results["steps"],
                                         "seconds": round(took, 1),
                                         "test": results["test"]} for name, results, took in pretrain_rows]})
    log.info("wrote %s, report.json and report.png", out / "report.md")
    return rows
