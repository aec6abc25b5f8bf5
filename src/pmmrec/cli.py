"""The ``pmmrec`` command line. Each command parses its arguments and calls one library function.

User errors (:class:`pmmrec.errors.PmmrecError`) print one line and exit with status 2; ``--debug`` shows the
traceback. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pmmrec import __version__
from pmmrec.errors import NotImplementedYet, PmmrecError
from pmmrec.utils.malloc import tune_malloc

log = logging.getLogger("pmmrec")

EPILOG_CONFIG = ("Overrides are dotted.key=value words after the options, e.g. model.fusion=sum train.epochs=3; "
                 "`pmmrec config show -c FILE` prints every key with its resolved value.")


def _example(text: str) -> str:
    return f"example:\n  {text}\n\n{EPILOG_CONFIG}" if "-c " in text else f"example:\n  {text}"


# ----------------------------------------------------------------------------------------------------------------
# data commands


def cmd_data_synth(args: argparse.Namespace) -> None:
    from pmmrec.data.synth import SynthConfig, synthesize_world

    summary = synthesize_world(args.out, SynthConfig(seed=args.seed, quick=args.quick), overwrite=args.overwrite)
    print(summary.format())


def cmd_data_prepare(args: argparse.Namespace) -> None:
    groups = _parse_groups(args.group) if args.group else None
    if args.split_by and not groups:
        raise PmmrecError("--split-by needs at least one --group NAME=VALUE,VALUE (e.g. --group kids=Animation)")
    from pmmrec.data.prepare import prepare_domain
    from pmmrec.data.tables import PrepareColumns

    columns = PrepareColumns(user=args.user_col, item=args.item_col, time=args.time_col, title=args.title_col,
                             image=args.image_col, meta_item=args.meta_item_col, sep=args.sep,
                             list_sep=args.list_sep)
    report = prepare_domain(args.interactions, args.items, args.out, image_dir=args.images, columns=columns,
                            kcore=args.kcore, min_seq_len=args.min_seq_len, split_by=args.split_by,
                            groups=groups, empty_title=args.empty_title, overwrite=args.overwrite)
    print(report.summary())


def _parse_groups(specs: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise PmmrecError(f"--group {spec!r}: expected NAME=VALUE[,VALUE...], e.g. kids=Animation,Children's")
        if name.strip() in groups:
            raise PmmrecError(f"--group {name.strip()!r} given twice")
        groups[name.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return groups


def cmd_data_build_images(args: argparse.Namespace) -> None:
    from pmmrec.data.image_db import build_image_db

    report = build_image_db(args.image_dir, args.out, overwrite=args.overwrite, workers=args.workers,
                            resize=args.resize)
    if args.report:
        report.write_report(args.report)
    print(report.summary())


def cmd_data_stats(args: argparse.Namespace) -> None:
    from pmmrec.data.domain import read_domain
    from pmmrec.data.stats import domain_stats, format_stats

    domain = read_domain(args.domain, empty_title="blank")
    stats = domain_stats(domain)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))


def cmd_data_import_reference(args: argparse.Namespace) -> None:
    from pmmrec.data.reference import import_reference

    report = import_reference(args.folder, args.out, name=args.name, image_format=args.image_format,
                              empty_title=args.empty_title, overwrite=args.overwrite)
    print(report.summary())


def cmd_data_import_atomic(args: argparse.Namespace) -> None:
    from pmmrec.data.atomic import import_atomic

    report = import_atomic(args.folder, args.out, name=args.name, image_dir=args.images,
                           title_field=args.title_field, image_field=args.image_field, min_seq_len=args.min_seq_len,
                           empty_title=args.empty_title, overwrite=args.overwrite)
    print(report.summary())


def cmd_data_export_atomic(args: argparse.Namespace) -> None:
    from pmmrec.config import load_config
    from pmmrec.data.atomic_export import export_atomic

    overrides = [f"data.{key}={value}" for key, value in (("max_seq_len", args.max_seq_len),
                                                          ("min_seq_len", args.min_seq_len)) if value is not None]
    data = load_config(args.config, overrides).data  # the split of the run this export is compared with
    report = export_atomic(args.domain, args.out, name=args.name, max_seq_len=data.max_seq_len,
                           min_seq_len=data.min_seq_len, images=args.images, overwrite=args.overwrite)
    print(report.summary())


# ----------------------------------------------------------------------------------------------------------------
# config, training and later-stage commands


def cmd_config_show(args: argparse.Namespace) -> None:
    from pmmrec.config import config_to_yaml, load_config

    print(config_to_yaml(load_config(args.config, args.overrides)), end="")


def cmd_train(args: argparse.Namespace) -> None:
    from pmmrec.config import load_config
    from pmmrec.training import train

    overrides = [*args.overrides, _objectives(args)] if args.objectives else args.overrides
    results = train(load_config(args.config, overrides), resume=args.resume)
    _print_results(results)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from pmmrec.config import load_config
    from pmmrec.training import pretrain

    results = pretrain(load_config(args.config, [*args.overrides, _objectives(args)]), resume=args.resume)
    for name, splits in (results.get("per_domain", {}) if _prints() else {}).items():
        metrics = splits["test"]["exclude_history"]
        print(f"{name:12s} test exclude_history HR@10 {metrics['HR@10']:.4f}  NDCG@10 {metrics['NDCG@10']:.4f}")
    _print_results(results)


def cmd_transfer(args: argparse.Namespace) -> None:
    from pmmrec.training import transfer

    if not args.checkpoint:
        raise PmmrecError("pmmrec transfer needs --from CHECKPOINT (e.g. runs/pretrain/checkpoints/best.pt)")
    overrides = [*args.overrides, _objectives(args)] if args.objectives else args.overrides
    _print_results(transfer(args.checkpoint, args.config, overrides, resume=args.resume))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pmmrec.evaluation.checkpoint import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, args.overrides, splits=args.split)
    if args.json and _prints():
        print(json.dumps(results, indent=2))
    else:
        _print_results(results)


def cmd_recommend(args: argparse.Namespace) -> None:
    from pmmrec.inference import Recommender

    history = args.history.replace(",", " ").split()
    if not history:
        raise PmmrecError("--history is empty: give item ids separated by spaces, e.g. --history 'i1 i2 i3'")
    recommender = Recommender.from_checkpoint(args.checkpoint, args.domain,
                                              unknown_items="reject" if args.strict else "skip")
    result = recommender.recommend_many([history], args.k, not args.include_history)[0]
    if result.unknown:
        log.warning("skipped %d unknown item id(s): %s", len(result.unknown), " ".join(result.unknown[:10]))
    if args.json:
        print(json.dumps({"items": [{"item_id": r.item_id, "score": r.score} for r in result.items],
                          "unknown": result.unknown}, indent=2))
        return
    for rank, r in enumerate(result.items, start=1):
        info = recommender.item(r.item_id)
        title = f"  {info.title}" if info is not None and info.title else ""
        print(f"{rank:3d}  {r.item_id}  {r.score:.4f}{title}")


def cmd_export_embeddings(args: argparse.Namespace) -> None:
    from pmmrec.inference import Recommender
    from pmmrec.inference.export import export_embeddings

    recommender = Recommender.from_checkpoint(args.checkpoint, args.domain)
    done = export_embeddings(recommender, args.out, args.ids, args.faiss, args.faiss_kind)
    print(f"wrote {done.count} item vectors of dimension {done.dim} to {done.vectors}, ids to {done.ids}"
          + (f", faiss index to {done.index}" if done.index else ""))


def cmd_serve(args: argparse.Namespace) -> None:
    from pmmrec.serving.server import serve

    serve(args.checkpoint, host=args.host, port=args.port, workers=args.workers, domain=args.domain,
          threads=args.threads, persist_items=args.persist_items, compare=args.compare)


def _objectives(args: argparse.Namespace) -> str:
    """``--objectives rec,nicl`` -> the override ``objectives.use=[rec, nicl]``."""
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    return f"objectives.use=[{', '.join(names)}]"


def _prints() -> bool:
    """Under torchrun every process runs the command and gets the results; rank 0 alone prints them."""
    return os.environ.get("RANK", "0") == "0"


def _print_results(results: dict) -> None:
    """A small table: split x protocol -> HR/NDCG/MRR@K."""
    if not _prints():
        return
    for split in ("valid", "test"):
        if split not in results:
            continue
        for protocol, metrics in results[split].items():
            cells = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("MRR"))
            print(f"{split:5s} {protocol:15s} {cells}")


BENCHMARKS = ("train", "eval", "serve")


def cmd_bench(args: argparse.Namespace) -> None:
    """Each benchmark is a module ``pmmrec.bench.<what>`` with ``run(args)``."""
    import importlib

    name = f"pmmrec.bench.{args.what}"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise NotImplementedYet(f"`pmmrec bench {args.what}` is not implemented yet") from None
    module.run(args)


def cmd_demo(args: argparse.Namespace) -> None:
    from pmmrec.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite, ablation=not args.no_ablation)


def cmd_report(args: argparse.Namespace) -> None:
    from pmmrec.report import format_table, report_runs

    rows = report_runs(args.runs, baseline=args.baseline, out=args.out)
    print(format_table(rows, reference=rows[0]["name"] if args.baseline is None else Path(args.baseline).name))
    if args.out:
        print(f"\nwrote {Path(args.out) / 'report.md'}, report.json and report.png")


def cmd_import_checkpoint(args: argparse.Namespace) -> None:
    from pmmrec.training.import_checkpoint import import_checkpoint

    report, _ = import_checkpoint(args.reference, args.out, text_encoder=args.text_encoder,
                                  vision_encoder=args.vision_encoder, allow_partial=args.allow_partial,
                                  num_heads=args.num_heads)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    print(f"wrote {args.out}; fine-tune it with: pmmrec transfer --from {args.out} data.domain=DOMAIN")


# ----------------------------------------------------------------------------------------------------------------
# parser


def _config_args(p: argparse.ArgumentParser, resume: bool = False) -> None:
    """``-c/--config`` and the ``key=value`` overrides; with ``resume``, ``--resume`` before them."""
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="continue from run.dir/checkpoints/last.pt exactly where it stopped")
    p.add_argument("-c", "--config", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")


DESCRIPTION = ("Transferable, ID-free, multi-modal sequential recommendation (PMMRec, ICDE 2024).\n"
               "Items are known only by their title and image, so new items are recommendable at once.")
EPILOG = (
    "typical flow:\n"
    "  pmmrec data synth --out data/world            # the built-in multi-domain world\n"
    "  pmmrec pretrain -c configs/cpu.yaml run.dir=runs/pretrain \\\n"
    "      data.sources=[data/world/books,data/world/films,data/world/games]  # pretrain on the source domains\n"
    "  pmmrec transfer -c configs/cpu.yaml --from runs/pretrain/checkpoints/best.pt \\\n"
    "      data.domain=data/world/target run.dir=runs/transfer                # fine-tune on the target domain\n"
    "  pmmrec evaluate --checkpoint runs/transfer/checkpoints/best.pt\n"
    "Run `pmmrec COMMAND --help` for each command's options and an example."
)


def _common_options() -> argparse.ArgumentParser:
    """The options every parser accepts (a parent parser): --debug and --verbose."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback on errors")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    return common


def _command(subparsers, name: str, help: str, example: str, func, **kw) -> argparse.ArgumentParser:
    """A command run by ``func``: its help is also its description, its example the epilog."""
    p = subparsers.add_parser(name, help=help, description=help, parents=[_common_options()],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_example(example), **kw)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmmrec", parents=[_common_options()],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"pmmrec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_inference_commands(sub)
    _add_bench_command(sub)
    _add_misc_commands(sub)
    return parser


def _add_data_commands(sub) -> None:
    """``pmmrec data``: synth, prepare, build-images, stats, then the importers and exporter."""
    data = sub.add_parser("data", help="prepare domains, build image databases, synthesise the built-in world",
                          parents=[_common_options()])
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)

    p = _command(dsub, "synth", "write the built-in multi-domain world (3 source domains + `target`)",
                 "pmmrec data synth --out data/world --seed 0", cmd_data_synth)
    p.add_argument("--out", required=True, help="output folder (one domain folder per domain)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--quick", action="store_true", help="a tiny world, for tests and smoke runs")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    _add_data_prepare(dsub)

    p = _command(dsub, "build-images", "build an image LMDB from a folder of image files (file stem = item id)",
                 "pmmrec data build-images posters/ data/ml1m/images.lmdb --workers 2", cmd_data_build_images)
    p.add_argument("image_dir", help="folder of images (searched recursively)")
    p.add_argument("out", help="the LMDB folder to create")
    p.add_argument("--workers", type=int, default=None, help="decode/validate processes (default: all cores)")
    p.add_argument("--resize", type=int, default=None, help="store re-encoded with the longer side <= PX")
    p.add_argument("--report", metavar="FILE", help="write a JSON report listing every bad, duplicated and "
                   "unused file with its reason (the log names the first five)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    p = _command(dsub, "stats", "print users / items / interactions / density / sequence lengths of a domain",
                 "pmmrec data stats data/world/target", cmd_data_stats)
    p.add_argument("domain", help="a domain folder")
    p.add_argument("--json", action="store_true", help="print JSON")

    _add_data_interchange(dsub)


def _add_data_prepare(dsub) -> None:
    """``pmmrec data prepare`` (:func:`pmmrec.data.prepare.prepare_domain`): column names, filters, groups."""
    p = _command(dsub, "prepare", "import an interaction log + item metadata (+ images) into a domain folder",
                 "pmmrec data prepare ratings.csv movies.csv --out data/ml1m --images posters/ "
                 "--item-col movie_id --user-col user_id --meta-item-col movie_id", cmd_data_prepare)
    p.add_argument("interactions", help="CSV/TSV/Parquet with user, item, timestamp columns")
    p.add_argument("items", help="CSV/TSV/Parquet with item, title[, image_path][, list columns such as genres]")
    p.add_argument("--out", required=True, help="output domain folder (or parent folder with --split-by)")
    p.add_argument("--images", help="folder of images named <item id>.<ext> (or use --image-col)")
    p.add_argument("--user-col", default="user", help="user column of INTERACTIONS (default: user)")
    p.add_argument("--item-col", default="item", help="item column of INTERACTIONS (default: item)")
    p.add_argument("--time-col", default="timestamp", help="time column of INTERACTIONS (default: timestamp)")
    p.add_argument("--meta-item-col", default=None, help="item column of ITEMS (default: same as --item-col)")
    p.add_argument("--title-col", default="title", help="title column of ITEMS (default: title)")
    p.add_argument("--image-col", default="image_path", help="image path column of ITEMS, if present")
    p.add_argument("--sep", default="auto", help="field separator for CSV/TSV: auto (default), ',', '\\t', ...")
    p.add_argument("--list-sep", default="|", help="separator inside list columns such as genres (default: |)")
    p.add_argument("--kcore", type=int, default=0, help="k-core filtering of users and items (0 = off)")
    p.add_argument("--min-seq-len", type=int, default=3, help="drop users with fewer interactions (default 3)")
    p.add_argument("--empty-title", choices=["error", "blank", "drop"], default="error",
                   help="items with an empty title: fail (default), keep with an empty title, or drop")
    p.add_argument("--split-by", help="a list column of ITEMS (e.g. genres): write one domain per --group")
    p.add_argument("--group", action="append", metavar="NAME=V1,V2",
                   help="a domain of --split-by: items whose values meet V1,V2 (first matching group wins)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _add_data_interchange(dsub) -> None:
    """``pmmrec data import-reference``, ``import-atomic`` and ``export-atomic``."""
    p = _command(dsub, "import-reference", "import the PMMRec authors' release (<name>_users.tsv, "
                 "<name>_items_texts.tsv, pickled-image <name>_items_images.lmdb) into a domain folder; images are "
                 "unpickled with an allow-list (anything else is refused) and re-encoded",
                 "pmmrec data import-reference downloads/bili_food --out data/bili_food", cmd_data_import_reference)
    p.add_argument("folder", help="the folder holding the reference files")
    p.add_argument("--name", help="the files' prefix, e.g. bilibili_food (needed when the folder holds several)")
    p.add_argument("--out", required=True, help="the domain folder to create")
    p.add_argument("--image-format", choices=["png", "jpeg"], default="png",
                   help="how images are stored: png (lossless, default) or jpeg (smaller)")
    p.add_argument("--empty-title", choices=["error", "blank"], default="error",
                   help="items with an empty title: fail (default) or keep them with an empty title")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = _command(dsub, "import-atomic",
                 "import RecBole atomic files into a domain folder: <name>.inter + <name>.item "
                 "(typed headers, title and optional image column), or the benchmark files "
                 "<name>.{train,valid,test}.inter that export-atomic writes",
                 "pmmrec data import-atomic recbole/ml-1m --out data/ml-1m --images recbole/ml-1m/posters",
                 cmd_data_import_atomic)
    p.add_argument("folder", help="the folder holding the atomic files")
    p.add_argument("--out", required=True, help="the domain folder to create")
    p.add_argument("--name", help="the dataset name (the files' prefix) when the folder holds several")
    p.add_argument("--images", help="folder the .item file's image paths are relative to (default: FOLDER)")
    p.add_argument("--title-field", help="title column of the .item file (default: title)")
    p.add_argument("--image-field", help="image path column of the .item file (default: image, image_path, ...)")
    p.add_argument("--min-seq-len", type=int, default=3, help="drop users with fewer interactions (.inter only)")
    p.add_argument("--empty-title", choices=["error", "blank"], default="error",
                   help="items with an empty title: fail (default) or keep them with an empty title")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    p = _command(dsub, "export-atomic", "write a domain's exact leave-one-out split as RecBole benchmark files "
                 "(<name>.{train,valid,test}.inter, <name>.item, a RecBole config and a split manifest), "
                 "so any RecBole model trains and tests on the same examples; the split follows the recipe's "
                 "data.max_seq_len and data.min_seq_len",
                 "pmmrec data export-atomic data/world/target --out recbole/target --config configs/tiny.yaml",
                 cmd_data_export_atomic)
    p.add_argument("domain", help="a domain folder")
    p.add_argument("--out", required=True, help="output folder; its name is the RecBole dataset name")
    p.add_argument("-c", "--config", help="the run's YAML recipe, whose data.max_seq_len/min_seq_len set the split")
    p.add_argument("--max-seq-len", type=int, help="override data.max_seq_len (default: the recipe's, else 20)")
    p.add_argument("--min-seq-len", type=int, help="override data.min_seq_len (default: the recipe's, else 3)")
    p.add_argument("--name", help="the dataset name (default: the --out folder's name)")
    p.add_argument("--images", action="store_true", help="also write each item's image into OUT/images/")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _add_training_commands(sub) -> None:
    """``pmmrec config show``, ``pretrain``, ``transfer`` and ``train``."""
    cfg = sub.add_parser("config", help="inspect configurations", parents=[_common_options()])
    csub = cfg.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    p = _command(csub, "show", "print the fully resolved config (recipe + overrides + defaults)",
                 "pmmrec config show -c configs/tiny.yaml model.fusion=sum", cmd_config_show)
    _config_args(p)
    p = _command(sub, "pretrain", "pretrain on several source domains (next-item, NICL, NID, RCL)",
                 "pmmrec pretrain -c configs/cpu.yaml data.sources=[data/world/books,data/world/films] "
                 "run.dir=runs/pretrain", cmd_pretrain)
    p.add_argument("--objectives", default="rec,nicl,nid,rcl", metavar="LIST",
                   help="pretraining objectives, any subset of rec,nicl,nid,rcl (default: all four; "
                        "nicl needs the multimodal item tower). Weights: objectives.weights.NAME=W")
    _config_args(p, resume=True)
    p = _command(sub, "transfer", "fine-tune a pretrained checkpoint on a target domain, by part and modality",
                 "pmmrec transfer -c configs/cpu.yaml --from runs/pretrain/checkpoints/best.pt "
                 "transfer.parts=item_encoder data.domain=data/world/target run.dir=runs/transfer", cmd_transfer)
    p.add_argument("--objectives", metavar="LIST", help="fine-tuning objectives (default: objectives.use, i.e. rec)")
    p.add_argument("--from", dest="checkpoint", help="the pretrained checkpoint (its text/vision/model settings "
                   "are used unless the recipe or overrides change them)")
    _config_args(p, resume=True)
    p = _command(sub, "train", "train from scratch on one domain (any item tower); writes run.dir",
                 "pmmrec train -c configs/tiny.yaml data.domain=data/world/target run.dir=runs/tiny", cmd_train)
    p.add_argument("--objectives", metavar="LIST", help="objectives (default: objectives.use, i.e. rec)")
    _config_args(p, resume=True)


def _add_inference_commands(sub) -> None:
    """``pmmrec evaluate``, ``recommend``, ``export-embeddings`` and ``serve``: a trained checkpoint at work."""
    p = _command(sub, "evaluate", "full-ranking evaluation (HR/NDCG/MRR@K, both protocols) of a checkpoint",
                 "pmmrec evaluate --checkpoint runs/tiny/checkpoints/best.pt [data.domain=OTHER_DOMAIN]",
                 cmd_evaluate)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train/pretrain/transfer")
    p.add_argument("--split", choices=["valid", "test"], action="append",
                   help="which split(s) to evaluate (default: both)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the checkpoint's config, e.g. data.domain=... eval.ks=[10]")
    domain_help = "the catalogue's domain folder (default: the checkpoint's data.domain)"
    p = _command(sub, "recommend", "top-K next items for a history of raw item ids",
                 "pmmrec recommend --checkpoint runs/x/checkpoints/best.pt --history 'i1 i2 i3' -k 10", cmd_recommend)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train/pretrain/transfer")
    p.add_argument("--history", required=True, help="raw item ids, oldest first, separated by spaces")
    p.add_argument("-k", type=int, default=10, help="how many items (default 10)")
    p.add_argument("--domain", help=domain_help)
    p.add_argument("--include-history", action="store_true", help="allow items of the history to be recommended")
    p.add_argument("--strict", action="store_true", help="fail on unknown ids (default: skip them with a warning)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = _command(sub, "export-embeddings", "write item vectors (.npy) and their ids, optionally a faiss index",
                 "pmmrec export-embeddings --checkpoint runs/x/checkpoints/best.pt --out items.npy "
                 "--faiss items.faiss",
                 cmd_export_embeddings)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train/pretrain/transfer")
    p.add_argument("--out", required=True, help="the vectors file (.npy, float32, one row per item)")
    p.add_argument("--ids", help="the ids file, one per line in row order (default: OUT with .ids.txt)")
    p.add_argument("--domain", help=domain_help)
    p.add_argument("--faiss", metavar="FILE", help="also write an inner-product faiss index (needs faiss-cpu)")
    p.add_argument("--faiss-kind", choices=["hnsw", "flat"], default="hnsw",
                   help="hnsw: approximate, for large catalogues (default); flat: exact")
    p = _command(sub, "serve",
                 "HTTP service (FastAPI): POST /recommend, POST /items, GET /items/ID, /health, /metrics; "
                 "the explorer page at / (users' histories and recommendations as pictures, add an item)",
                 "pmmrec serve --checkpoint runs/x/checkpoints/best.pt --port 8000 "
                 "[--compare runs/y/checkpoints/best.pt]",
                 cmd_serve)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train/pretrain/transfer")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (default 1; with more, POST /items is refused: each holds its own "
                        "catalogue)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per scoring batch (default 1: concurrent requests are scored in batches, "
                        "one batch per core at a time)")
    p.add_argument("--domain", help=domain_help)
    p.add_argument("--persist-items", action="store_true",
                   help="write items added through POST /items into the domain folder (items.tsv, images.lmdb)")
    p.add_argument("--compare", metavar="CHECKPOINT",
                   help="a second checkpoint shown side by side on the explorer page (e.g. scratch vs transferred), "
                        "over the same catalogue")


def _add_bench_command(sub) -> None:
    """``pmmrec bench WHAT``: each benchmark is a module ``pmmrec.bench.<what>`` (:func:`cmd_bench`)."""
    p = _command(sub, "bench", "benchmarks written as JSON ratios (train / eval / serve)",
                 "pmmrec bench train --out bench.json --quick", cmd_bench)
    p.add_argument("what", choices=BENCHMARKS, help="train: naive vs optimised training step; eval: full ranking "
                   "vs a raw matmul+top-K floor; serve: HTTP latency under concurrent load")
    p.add_argument("--out", help="JSON file for the results (default: bench-WHAT.json)")
    p.add_argument("--quick", action="store_true", help="small sizes, done in seconds (for tests)")


def _add_misc_commands(sub) -> None:
    """``pmmrec import-checkpoint``, ``demo`` and ``report``."""
    p = _command(sub, "import-checkpoint",
                 "convert the PMMRec authors' pretrained checkpoint (e.g. Pmmrec_pt) into a "
                 "pmmrec checkpoint for `pmmrec transfer --from`; every tensor is reported mapped or unmapped",
                 "pmmrec import-checkpoint pretrain-PT/epoch-0.pt --text-encoder models/xlm-roberta-base "
                 "--vision-encoder models/clip-vit-base-patch32 --out pmmrec_pt.pt", cmd_import_checkpoint)
    p.add_argument("reference", help="the reference checkpoint (read with torch.load(weights_only=True))")
    p.add_argument("--text-encoder", required=True, help="local folder of the text encoder it was trained with "
                   "(paper: xlm-roberta-base; architecture and tokenizer, the weights come from the checkpoint)")
    p.add_argument("--vision-encoder", required=True, help="local folder of the vision encoder it was trained with "
                   "(paper: clip-vit-base-patch32, with its preprocessor_config.json)")
    p.add_argument("--out", required=True, help="the pmmrec checkpoint to write")
    p.add_argument("--allow-partial", action="store_true",
                   help="accept a checkpoint that fills only part of the model (default: refuse)")
    p.add_argument("--num-heads", type=int, default=2, help="SASRec attention heads (paper: 2)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")

    p = _command(sub, "demo", "the end-to-end demo on the built-in world (what `make demo` runs)",
                 "pmmrec demo --out runs/demo --quick", cmd_demo)
    p.add_argument("--out", default="runs/demo", help="demo folder (report.md, world/, config.yaml)")
    p.add_argument("--quick", action="store_true", help="a tiny world, done in seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of every run")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the objective ablation (two extra pretrainings: rec only, rec + NICL)")
    p.add_argument("--overwrite", action="store_true", default=True, help=argparse.SUPPRESS)
    p = _command(sub, "report", "compare finished runs: one table (HR@10, NDCG@10, gain vs a baseline) and a plot",
                 "pmmrec report runs/scratch runs/transfer runs/transfer-text --out runs/compare", cmd_report)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding results.json")
    p.add_argument("--baseline", metavar="RUN", help="the run the gains are relative to (default: the first RUN)")
    p.add_argument("--out", metavar="DIR", help="also write DIR/report.md, report.json and report.png")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    tune_malloc()  # freed tensors' memory is reused, not faulted in again every step (pmmrec.utils.malloc)
    try:
        args.func(args)
    except PmmrecError as e:
        if debug:
            raise
        print(f"pmmrec: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, missing file: the environment, not a pmmrec bug
        if debug:
            raise
        print(f"pmmrec: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pmmrec: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
