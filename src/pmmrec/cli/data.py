"""``pmmrec data``: synth, prepare, build-images, stats, sample, import-reference, import-atomic and export-atomic."""

from __future__ import annotations

import argparse
import json

from pmmrec.cli.common import _command, _common_options
from pmmrec.errors import PmmrecError


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
                             list_sep=args.list_sep, time_unit=args.time_unit)
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


def cmd_data_sample(args: argparse.Namespace) -> None:
    from pmmrec.data.sample import sample_domain

    report = sample_domain(args.domain, args.out, args.users, seed=args.seed, overwrite=args.overwrite,
                           rest=args.rest)
    print(report.summary())


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
                                                          ("min_seq_len", args.min_seq_len),
                                                          ("history", args.history)) if value is not None]
    data = load_config(args.config, overrides).data  # the split of the run this export is compared with
    report = export_atomic(args.domain, args.out, name=args.name, max_seq_len=data.max_seq_len,
                           min_seq_len=data.min_seq_len, history=data.history, images=args.images,
                           overwrite=args.overwrite)
    print(report.summary())


def _add_data_commands(sub) -> None:
    """``pmmrec data``: synth, prepare, build-images, stats, sample, then the importers and exporter."""
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

    p = _command(dsub, "sample", "a smaller domain: N users drawn at random (whole histories, in order), the items "
                 "they touch (in items.tsv order) and those items' images; sample_report.json in OUT says what was "
                 "kept of how many and with which seed (the same seed gives the same sample)",
                 "pmmrec data sample data/ml1m --users 600 --seed 0 --out data/ml1m-600", cmd_data_sample)
    p.add_argument("domain", help="a domain folder (e.g. written by data prepare)")
    p.add_argument("--users", type=int, required=True, metavar="N",
                   help="how many users to keep: 1 to the domain's number of users")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draw (default 0)")
    p.add_argument("--out", required=True, help="the domain folder to create (built beside it, then renamed)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and --rest) if it exists")
    p.add_argument("--rest", metavar="DIR", help="also write the users not drawn (and what they touch) as a domain "
                   "folder: users a model trained on the sample never saw, to evaluate it on with `pmmrec "
                   "evaluate --checkpoint ... data.domain=DIR`")

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
    p.add_argument("--time-col", default="timestamp", help="time column of INTERACTIONS (default: timestamp): unix "
                   "epochs or ISO-8601 dates/datetimes (2018-09-20, 2018-09-20T14:03:00Z)")
    p.add_argument("--time-unit", choices=["auto", "s", "ms"], default="auto",
                   help="unit of numeric timestamps (auto: milliseconds from 1e11 on); matters only where a column "
                        "mixes numbers and ISO dates")
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
                 "data.max_seq_len, data.min_seq_len and data.history",
                 "pmmrec data export-atomic data/world/target --out recbole/target --config configs/tiny.yaml",
                 cmd_data_export_atomic)
    p.add_argument("domain", help="a domain folder")
    p.add_argument("--out", required=True, help="output folder; its name is the RecBole dataset name")
    p.add_argument("-c", "--config", help="the run's YAML recipe, whose data.max_seq_len/min_seq_len set the split")
    p.add_argument("--max-seq-len", type=int, help="override data.max_seq_len (default: the recipe's, else 20)")
    p.add_argument("--min-seq-len", type=int, help="override data.min_seq_len (default: the recipe's, else 3)")
    p.add_argument("--history", choices=["all", "reference"],
                   help="override data.history (default: the recipe's, else all: whole histories)")
    p.add_argument("--name", help="the dataset name (default: the --out folder's name)")
    p.add_argument("--images", action="store_true", help="also write each item's image into OUT/images/")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
