"""``pmmrec demo`` (what ``make demo`` runs): the built-in world, end to end, on one CPU machine.

It synthesises the multi-domain world (DESIGN section 10), reads every domain back through the validating
reader, trains on the target domain from scratch (multimodal PMMRec with the default pretrained encoders kept
frozen and their features cached, and the ID-based SASRec baseline), evaluates everything with full ranking
beside a most-popular baseline, and writes ``report.md``, ``report.json`` and ``report.png`` into the demo folder.
Pretraining and transfer join the table when they land.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from pmmrec.config import Config, load_config
from pmmrec.data.domain import read_domain
from pmmrec.data.stats import domain_stats, format_stats
from pmmrec.data.synth import SynthConfig, read_world, synthesize_world
from pmmrec.evaluation.baselines import most_popular
from pmmrec.training.trainer import Trainer, eval_splits, load_split
from pmmrec.utils.io import atomic_file, atomic_write_text

log = logging.getLogger(__name__)

# The CPU recipe (identical to configs/cpu.yaml, which a test checks): the default pretrained encoders, fully
# frozen so their outputs are computed once per item; projections, fusion and SASRec train.
CPU_RECIPE = [
    "text.encoder=minilm", "text.max_tokens=32", "text.trainable_layers=0",
    "vision.encoder=efficientnet-lite0", "vision.trainable_layers=0",
    "model.dim=64", "model.fusion=merged_attention",
    "train.epochs=30", "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=20", "train.patience=5",
    "train.deterministic=true",
]
QUICK = ["train.epochs=8", "train.patience=8"]
METRICS = ("HR@10", "NDCG@10")
VARIANTS = [  # (name, overrides on top of the recipe)
    ("PMMRec multimodal, scratch", []),
    ("SASRec (item IDs), scratch", ["model.item_tower=id"]),
]


def demo_config(world: Path, run_dir: Path, quick: bool = False, seed: int = 0,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The CPU recipe pointed at the built-in world (sources for pretraining, ``target`` for training),
    plus a variant's ``overrides``."""
    domains = read_world(world)["domains"]
    sources = [(world / d["folder"]).as_posix() for d in domains if d["role"] == "source"]
    target = next((world / d["folder"]).as_posix() for d in domains if d["role"] == "target")
    return load_config(None, [*CPU_RECIPE, *(QUICK if quick else []), f"data.sources=[{', '.join(sources)}]",
                              f"data.domain={target}", f"run.dir={run_dir.as_posix()}", f"seed={seed}",
                              *overrides])


def _row(name: str, results: dict, seconds: float | None) -> dict:
    row = {"name": name, "seconds": None if seconds is None else round(seconds, 1)}
    for protocol in ("exclude_history", "include_history"):
        for metric in METRICS:
            row[f"{metric}/{protocol}"] = results["test"][protocol][metric]
    row["HR@10"], row["NDCG@10"] = row["HR@10/exclude_history"], row["NDCG@10/exclude_history"]
    return row


def _table(rows: list[dict]) -> str:
    head = ("| variant | HR@10 | NDCG@10 | HR@10 (incl. history) | NDCG@10 (incl. history) | gain vs scratch | "
            "time |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        gain = "" if r["gain_vs_scratch"] is None else f"{r['gain_vs_scratch']:+.0%}"
        took = "" if r["seconds"] is None else f"{r['seconds']:.0f}s"
        lines.append(f"| {r['name']} | {r['HR@10']:.4f} | {r['NDCG@10']:.4f} | {r['HR@10/include_history']:.4f} | "
                     f"{r['NDCG@10/include_history']:.4f} | {gain} | {took} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.38
    xs = range(len(rows))
    for k, metric in enumerate(METRICS):
        ax.bar([x + (k - 0.5) * width for x in xs], [r[metric] for r in rows], width, label=metric)
    ax.set_xticks(list(xs), [r["name"] for r in rows], fontsize=8)
    ax.set_ylabel("test, exclude_history")
    ax.set_title("pmmrec demo: target domain, full ranking")
    ax.legend()
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, overwrite: bool = True) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = out / "world"
    started = time.perf_counter()
    summary = synthesize_world(world, SynthConfig(seed=seed, quick=quick), overwrite=overwrite)
    print(summary.format())

    sections = []
    for entry in read_world(world)["domains"]:
        stats = domain_stats(read_domain(world / entry["folder"], missing_image="error"))
        sections.append((entry["name"], stats))
    print(f"\n== target ==\n{format_stats(sections[-1][1])}\n")

    runs = out / "runs"
    if runs.exists() and overwrite:
        shutil.rmtree(runs)  # the demo always starts its runs afresh
    rows = []
    base = demo_config(world, runs, quick, seed)
    split = load_split(base)  # read once, shared by every variant
    _, test = eval_splits(split, base.data.max_seq_len)
    popular = {"test": most_popular(split.train_counts, test, base.eval.ks)}
    rows.append(_row("Most popular", popular, None))
    for name, overrides in VARIANTS:
        run_dir = out / "runs" / name.split(",")[0].split()[0].lower()
        config = demo_config(world, run_dir, quick, seed, overrides)
        print(f"training {name} ...", flush=True)
        t0 = time.perf_counter()
        results = Trainer(config, split=split).fit()
        rows.append(_row(name, results, time.perf_counter() - t0))
    scratch = rows[1]
    for row in rows:
        row["gain_vs_scratch"] = (row["NDCG@10"] - scratch["NDCG@10"]) / scratch["NDCG@10"] \
            if scratch["NDCG@10"] > 0 else None
    table = _table(rows)
    total = time.perf_counter() - started
    print(f"\n{table}\n\n(test split; HR/NDCG@10 under exclude_history unless marked; "
          f"{total:.0f}s in all)")

    lines = ["# pmmrec demo", "", f"Built-in world (seed {seed}{', quick' if quick else ''}), target domain, "
             "full ranking over every target item, test split.", "", table, "",
             "Gain is relative NDCG@10 (exclude_history) against PMMRec trained from scratch.", "",
             f"Total time {total:.0f}s on this machine.", ""]
    for name, stats in sections:
        lines += [f"## {name}", "", "```", format_stats(stats), "```", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "report.json", json.dumps({"rows": rows, "seed": seed, "quick": quick,
                                                      "seconds": round(total, 1)}, indent=2) + "\n")
    _plot(rows, out / "report.png")
    log.info("wrote %s, report.json and report.png", out / "report.md")
    return rows
