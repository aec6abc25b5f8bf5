#!/usr/bin/env python
"""The MovieLens-1M table of the README: prepare ML-1M, train every variant, write the table.

Protocol (the published one): leave-one-out, whole histories, all 3,706 movies ranked, seen items excluded
(``exclude_history``; ``include_history`` reported beside it), HR and NDCG at 10 and 20 on the test split.
Variants: most popular, ID SASRec, PMMRec text-only, vision-only, multimodal, and content+ID, all on
``configs/real-cpu.yaml``. Finished runs are reused and unfinished ones resumed, so the script can be stopped and
started again; each run's wall time is the sum over its sessions (``wall_seconds`` in the run folder).

    python scripts/ml1m_table.py [--data ../shared/datasets/movielens-1m] [--out runs/ml1m] [--seeds 0 1 2]
                                 [--only sasrec multimodal] [--threads 2] [--jobs 1]

Writes ``OUT/table.md`` and ``OUT/table.json``. Needs the MovieLens-1M files (ratings.csv, movies.csv,
posters/); they are not part of pmmrec and must never be committed.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

from studies import REPO, pmmrec, require_movielens, run_all, run_folder

from pmmrec.utils.io import atomic_write_text

RECIPE = REPO / "configs" / "real-cpu.yaml"
# name -> (pmmrec command words, overrides)
VARIANTS = {
    "pop": ("most popular", ["baseline", "pop"], []),
    "sasrec": ("SASRec (item IDs)", ["baseline", "sasrec"], []),
    "text": ("PMMRec text only", ["train"], ["model.modality=text"]),
    "vision": ("PMMRec vision only", ["train"], ["model.modality=vision", "data.missing_image=blank"]),
    "multimodal": ("PMMRec multimodal", ["train"], ["data.missing_image=blank"]),
    "content+id": ("PMMRec multimodal + IDs", ["train"], ["model.item_tower=content+id", "data.missing_image=blank"]),
}
METRICS = [("exclude_history", "HR@10"), ("exclude_history", "NDCG@10"), ("exclude_history", "HR@20"),
           ("exclude_history", "NDCG@20"), ("include_history", "HR@10"), ("include_history", "NDCG@10")]


def prepare(data: Path, out: Path, threads: int) -> Path:
    domain = out / "data" / "ml1m"
    if not (domain / "users.tsv").is_file():
        require_movielens(data)
        pmmrec("data", "prepare", str(data / "ratings.csv"), str(data / "movies.csv"), "--out", str(domain),
               "--images", str(data / "posters"), threads=threads)
    return domain


def run(name: str, seed: int, domain: Path, out: Path, threads: int) -> dict:
    _, words, overrides = VARIANTS[name]
    folder = out / "runs" / f"{name}-s{seed}"
    return run_folder(folder, [*words, "-c", str(RECIPE), f"data.domain={domain}", f"run.dir={folder}",
                               f"seed={seed}", f"train.cache_dir={out / 'cache'}", *overrides], threads)


def table(rows: dict[str, list[dict]]) -> str:
    head = "| variant | seeds | " + " | ".join(
        f"{m}{'' if p == 'exclude_history' else ' (incl. history)'}" for p, m in METRICS) + " | epochs | wall time |"
    lines = [head, "|" + "---|" * (len(METRICS) + 4)]
    for name, results in rows.items():
        cells = []
        for protocol, metric in METRICS:
            values = [r["test"][protocol][metric] for r in results]
            mean = statistics.mean(values)
            cells.append(f"{mean:.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""))
        epochs = "/".join(str(r.get("epochs", "")) for r in results) if "epochs" in results[0] else "-"
        walls = [r["wall_seconds"] for r in results if r.get("wall_seconds")]
        wall = f"{statistics.mean(walls) / 60:.0f} min" if walls else "-"
        lines.append(f"| {VARIANTS[name][0]} | {len(results)} | " + " | ".join(cells) + f" | {epochs} | {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "movielens-1m")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ml1m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, e.g. --jobs 2 --threads 1 on 2 cores")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    domain = prepare(args.data, args.out, args.threads)
    pairs = [(name, seed) for name in args.only for seed in args.seeds]
    done = run_all([functools.partial(run, name, seed, domain, args.out, args.threads) for name, seed in pairs],
                   args.jobs)
    rows: dict[str, list[dict]] = {}
    for (name, _), result in zip(pairs, done, strict=True):
        rows.setdefault(name, []).append(result)
    text = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    intro = (f"MovieLens-1M, leave-one-out, whole histories (data.history: all), all {rows[args.only[0]][0]['num_items']}"
             " items ranked, test split; seen items excluded unless marked; mean ± std over seeds.")
    atomic_write_text(args.out / "table.md", intro + "\n\n" + text + "\n")
    atomic_write_text(args.out / "table.json", json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
