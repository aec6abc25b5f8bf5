#!/usr/bin/env python
"""When does transfer pay on real data? The gain-vs-size study of the README, on MovieLens-1M's genre domains.

1. Prepare ML-1M as genre domains whose movies never overlap: kids (the target), action, comedy, drama (sources).
2. Pretrain on the three sources (``configs/real-cpu.yaml``: whole histories, catalogue softmax), once per
   objective set of ``--pretrain`` (default: ``rec``; ``--pretrain rec rec,nicl rec,nicl,nid,rcl`` is the
   objectives ablation), with early stopping on the sources' validation NDCG@10.
3. Subsample the target (``pmmrec data sample kids --users N --seed S``) at each ``--sizes`` (``all`` = every
   kids user); each size below all is drawn once per seed of ``--seeds``.
4. On each target: most popular, scratch, transfer of the full model, of the item encoder only, of the user
   encoder only, and zero-shot (``pmmrec evaluate --out``: the pretrained model ranking the target's catalogue with
   no fine-tuning). Objective sets other than the first are transferred in full only.
5. ``pmmrec report --curve`` over every run: OUT/curve/curve.{md,json,png}; OUT/gains.md: each variant's NDCG@10
   gain over scratch on the same target (paired by size and seed), mean ± std over seeds.
6. With ``--heldout``: every model trained on a sample (and the pretrained one, zero-shot) is also evaluated on the
   kids users that sample did not draw (``pmmrec data sample --rest``; thousands of users instead of the sample's
   100-1,000 test users), and most popular by the sample's own training counts on those users:
   OUT/heldout/SIZE-sSEED/VARIANT, and OUT/gains-heldout.md (test NDCG@10, and the gains over scratch).

Finished runs are reused and unfinished ones resumed, so the script can be stopped and started again.

    python scripts/transfer_study.py [--data ../shared/datasets/movielens-1m] [--out runs/transfer]
        [--sizes 100 300 1000 all] [--seeds 0 1 2] [--pretrain rec] [--threads 2] [--jobs 1]
        [--recipe configs/real-cpu.yaml] [--set KEY=VALUE ...] [--target-set KEY=VALUE ...]
        [--pretrain-set KEY=VALUE ...] [--parts full item_encoder user_encoder] [--heldout]

Needs the MovieLens-1M files (ratings.csv, movies.csv, posters/); never commit them or anything made from them.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from studies import REPO, pmmrec, require_movielens, run_all, run_folder

from pmmrec.utils.io import atomic_write_text

RECIPE = REPO / "configs" / "real-cpu.yaml"
GROUPS = ["kids=Animation,Children's", "action=Action,Adventure,Thriller", "comedy=Comedy,Romance",
          "drama=Drama,Crime,War"]
TARGET, SOURCES = "kids", ("action", "comedy", "drama")
# Pretraining stops after 3 evaluations without a better source validation NDCG@10 (at most 30 epochs): the
# sources hold ~860k interactions, so an epoch is long and the curve flat well before patience 10 would end it.
PRETRAIN = ["train.patience=3", "train.epochs=30"]
PARTS = ("full", "item_encoder", "user_encoder")


@dataclass
class Study:
    out: Path
    recipe: Path = RECIPE
    threads: int = 2
    # for every run, after the study's own settings: 7 ML-1M movies have no poster, then --set
    extra: list[str] = field(default_factory=lambda: ["data.missing_image=blank"])
    target_extra: list[str] = field(default_factory=list)  # --target-set: the target runs only, after extra
    pretrain_extra: list[str] = field(default_factory=list)  # --pretrain-set: pretraining only, after extra
    parts: tuple[str, ...] = PARTS  # --parts: what of the first pretraining is transferred

    def run(self, folder: Path, words: list[str], resumable: bool = True, target: bool = False,
            pretraining: bool = False) -> dict:
        extra = [*self.extra, *(self.target_extra if target else self.pretrain_extra if pretraining else [])]
        return run_folder(folder, [*words, f"train.cache_dir={self.out / 'cache'}", *extra], self.threads,
                          resumable)


def prepare(data: Path, study: Study) -> Path:
    root = study.out / "data" / "genres"
    if not (root / TARGET / "users.tsv").is_file():
        require_movielens(data)
        groups = [arg for group in GROUPS for arg in ("--group", group)]
        pmmrec("data", "prepare", str(data / "ratings.csv"), str(data / "movies.csv"), "--out", str(root),
               "--images", str(data / "posters"), "--split-by", "genres", *groups, threads=study.threads)
    return root


def target(root: Path, study: Study, size: str, seed: int) -> Path:
    """The kids domain, or a sample of ``size`` of its users drawn with ``seed``."""
    if size == "all":
        return root / TARGET
    folder = study.out / "data" / f"{TARGET}-{size}-s{seed}"
    if not (folder / "users.tsv").is_file():
        pmmrec("data", "sample", str(root / TARGET), "--users", size, "--seed", str(seed), "--out", str(folder),
               "--overwrite", threads=study.threads)
    return folder


def pretrain(root: Path, study: Study, objectives: str) -> Path:
    folder = study.out / "pretrain" / objectives.replace(",", "+")
    sources = ",".join(str(root / name) for name in SOURCES)
    study.run(folder, ["pretrain", "-c", str(study.recipe), "--objectives", objectives,
                       f"data.sources=[{sources}]", f"run.dir={folder}", *PRETRAIN], pretraining=True)
    return folder / "checkpoints" / "best.pt"


def variants(study: Study, checkpoints: dict[str, Path], first: str) -> dict[str, list[str]]:
    """Run name -> pmmrec words (without the target, run folder and seed)."""
    recipe = str(study.recipe)
    out = {"pop": ["baseline", "pop", "-c", recipe], "scratch": ["train", "-c", recipe]}
    for objectives, checkpoint in checkpoints.items():
        tag = objectives.replace(",", "+")
        for part in study.parts if objectives == first else ("full",):
            out[f"transfer-{part}-{tag}"] = ["transfer", "-c", recipe, "--from", str(checkpoint),
                                             f"transfer.parts={part}"]
        out[f"zero-shot-{tag}"] = ["evaluate", "--checkpoint", str(checkpoint)]
    return out


def rest(root: Path, study: Study, size: str, seed: int) -> Path:
    """The kids users that the sample of ``size`` drawn with ``seed`` does not hold, as a domain."""
    folder = study.out / "data" / f"{TARGET}-{size}-s{seed}-rest"
    if not (folder / "users.tsv").is_file():
        again = study.out / "data" / f".{TARGET}-{size}-s{seed}-again"  # the same sample, drawn again with it
        pmmrec("data", "sample", str(root / TARGET), "--users", size, "--seed", str(seed), "--out", str(again),
               "--rest", str(folder), "--overwrite", threads=study.threads)
        sample = study.out / "data" / f"{TARGET}-{size}-s{seed}"
        if (again / "users.tsv").read_bytes() != (sample / "users.tsv").read_bytes():
            raise SystemExit(f"{again} differs from {sample}: the draw is not reproducible, so its rest is unknown")
        shutil.rmtree(again)
    return folder


def heldout(study: Study, words: list[str], trained: Path, others: Path, folder: Path) -> dict:
    """The model of run ``trained`` (the pretrained one for zero-shot) evaluated on the users ``others``."""
    checkpoint = words[2] if words[0] == "evaluate" else str(trained / "checkpoints" / "best.pt")
    return study.run(folder, ["evaluate", "--out", str(folder), "--checkpoint", checkpoint,
                              f"data.domain={others}"], resumable=False, target=True)


def run(study: Study, words: list[str], domain: Path, folder: Path, seed: int) -> dict:
    if words[0] == "evaluate":  # zero-shot: no training, the evaluation is the run
        return study.run(folder, [words[0], "--out", str(folder), *words[1:], f"data.domain={domain}"],
                         resumable=False, target=True)
    return study.run(folder, [*words, f"data.domain={domain}", f"run.dir={folder}", f"seed={seed}"], target=True)


def gains(results: dict[tuple[str, str, int], dict]) -> str:
    """Markdown: per variant and size, the relative test NDCG@10 gain over scratch on the same target."""
    def gain(result: dict, size: str, seed: int) -> float | None:
        base = results[("scratch", size, seed)]["test"]["exclude_history"]["NDCG@10"]
        return result["test"]["exclude_history"]["NDCG@10"] / base - 1 if base > 0 else None

    return _table(results, "gain over scratch, test NDCG@10", gain, "{:+.1%}", "{:.1%}", skip="scratch")


def _table(results: dict[tuple[str, str, int], dict], title: str, value, mean: str, spread: str,
           skip: str | None = None) -> str:
    """Markdown: a row per variant (but ``skip``), a column per size, each cell the mean ± std over seeds of
    ``value(result, size, seed)`` (None: left out), formatted with ``mean`` and ``spread``, and how many there
    were."""
    sizes = list(dict.fromkeys(size for _, size, _ in results))
    names = [n for n in dict.fromkeys(name for name, _, _ in results) if n != skip]
    lines = [f"| {title} | " + " | ".join(f"{s} users" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for name in names:
        cells = []
        for size in sizes:
            values = [v for (n, s, seed), r in results.items()
                      if n == name and s == size and (v := value(r, s, seed)) is not None]
            std = " ± " + spread.format(statistics.stdev(values)) if len(values) > 1 else ""
            cells.append(f"{mean.format(statistics.mean(values))}{std} ({len(values)})" if values else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "movielens-1m")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "transfer")
    parser.add_argument("--sizes", nargs="+", default=["100", "300", "1000", "all"],
                        help="target users (numbers, or all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="one sample (and training seed) per seed at each size below all; all uses the first")
    parser.add_argument("--pretrain", nargs="+", default=["rec"],
                        help="objective sets to pretrain with, e.g. rec rec,nicl rec,nicl,nid,rcl (the first is "
                        "transferred by part too, the others in full)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once (pretraining sets, then target runs); e.g. --jobs 2 --threads 1 on 2 cores")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe of every run (default: %(default)s)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every run, e.g. train.epochs=2 (after the study's own)")
    parser.add_argument("--heldout", action="store_true",
                        help="also evaluate every sample's models on the kids users the sample did not draw")
    parser.add_argument("--target-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for the target runs only (not pretraining), after --set, e.g. "
                             "train.patience=30; use a new --out, since finished runs are reused as they are")
    parser.add_argument("--pretrain-set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for pretraining only, after --set, e.g. model.feature_dropout=0.5 (which a "
                             "transfer does not inherit; the rest of the model section it does); use a new --out")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="what of the first --pretrain set is transferred (default: all three); the other sets "
                             "are transferred in full")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    for size in args.sizes:
        if size != "all" and not (size.isdigit() and int(size) > 0):
            parser.error(f"--sizes: {size!r} is neither a positive number nor all")
    study = Study(args.out, args.recipe.resolve(), args.threads)
    study.extra.extend(args.set)
    study.target_extra.extend(args.target_set)
    study.pretrain_extra.extend(args.pretrain_set)
    study.parts = tuple(dict.fromkeys(args.parts))
    root = prepare(args.data, study)
    paths = run_all([functools.partial(pretrain, root, study, objectives) for objectives in args.pretrain], args.jobs)
    checkpoints = dict(zip(args.pretrain, paths, strict=True))
    keys, tasks, folders = [], [], []
    for size in args.sizes:
        for seed in (args.seeds if size != "all" else args.seeds[:1]):
            domain = target(root, study, size, seed)
            for name, words in variants(study, checkpoints, args.pretrain[0]).items():
                folder = args.out / "runs" / f"{size}-s{seed}" / name
                keys.append((name, size, seed))
                tasks.append(functools.partial(run, study, words, domain, folder, seed))
                folders.append(folder)
    results: dict[tuple[str, str, int], dict] = dict(zip(keys, run_all(tasks, args.jobs), strict=True))
    pmmrec("report", "--curve", "--by", "name", *map(str, folders), "--out", str(args.out / "curve"), threads=args.threads)
    text = gains(results)
    atomic_write_text(args.out / "gains.md", text + "\n")
    atomic_write_text(args.out / "results.json", json.dumps(
        [{"variant": n, "size": s, "seed": seed, **r} for (n, s, seed), r in results.items()], indent=2) + "\n")
    print(text)
    if args.heldout:
        words, keys_held, tasks = variants(study, checkpoints, args.pretrain[0]), [], []
        for (name, size, seed), folder in zip(keys, folders, strict=True):
            if size == "all":  # no user is left out of all
                continue
            others = rest(root, study, size, seed)
            target_folder = args.out / "heldout" / f"{size}-s{seed}" / name
            keys_held.append((name, size, seed))
            if name == "pop":  # ranked by the sample's own counts: what its shop would know
                tasks.append(functools.partial(heldout_pop, study, target(root, study, size, seed), others,
                                               target_folder))
            else:
                tasks.append(functools.partial(heldout, study, words[name], folder, others, target_folder))
        evaluations = dict(zip(keys_held, run_all(tasks, args.jobs), strict=True))
        text = means(evaluations) + "\n\n" + gains(evaluations)
        atomic_write_text(args.out / "gains-heldout.md", text + "\n")
        print("evaluated on the users each sample did not draw:")
        print(text)


def heldout_pop(study: Study, sample: Path, others: Path, folder: Path) -> dict:
    """Most popular by the training counts of ``sample``, evaluated on the users ``others`` (run folder
    ``folder``, as ``pmmrec baseline pop`` writes it)."""
    from pmmrec.config import load_config
    from pmmrec.evaluation.baselines import run_most_popular

    if (folder / "results.json").is_file():
        return json.loads((folder / "results.json").read_text())
    config = load_config(study.recipe, [f"data.domain={others}", f"run.dir={folder}", *study.extra,
                                        *study.target_extra])
    return run_most_popular(config, counts_from=sample)


def means(results: dict[tuple[str, str, int], dict]) -> str:
    """Markdown: per variant and size, test NDCG@10 mean ± std over seeds."""
    return _table(results, "test NDCG@10", lambda r, size, seed: r["test"]["exclude_history"]["NDCG@10"],
                  "{:.3f}", "{:.3f}")


if __name__ == "__main__":
    main()
