"""``pmmrec bench``, ``import-checkpoint``, ``demo`` and ``report``."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path

from pmmrec.cli.common import _command
from pmmrec.errors import NotImplementedYet

BENCHMARKS = ("train", "eval", "serve", "epoch", "encode", "recall", "start")


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
    # Benchmarks start servers and stop them in a `finally`, which a SIGTERM (kill, a CI timeout) would skip,
    # leaving them building or serving on their own: as SystemExit it runs. Signals are set in the main thread only.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        module.run(args)
    finally:
        if main_thread:  # None: the previous handler was not set from Python; the default is what it was
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def cmd_demo(args: argparse.Namespace) -> None:
    from pmmrec.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite, ablation=not args.no_ablation)


def cmd_report(args: argparse.Namespace) -> None:
    from pmmrec.report import format_curve, format_table, report_curve, report_runs

    if args.curve:
        points = report_curve(args.runs, out=args.out, by=args.by)
        print(format_curve(points))
        if args.out:
            print(f"\nwrote {Path(args.out) / 'curve.md'}, curve.json and curve.png")
        return
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


def _add_bench_command(sub) -> None:
    """``pmmrec bench WHAT``: each benchmark is a module ``pmmrec.bench.<what>`` (:func:`cmd_bench`)."""
    p = _command(sub, "bench", "benchmarks written as JSON (train / eval / serve / epoch / encode / recall / start)",
                 "pmmrec bench train --out bench.json --quick", cmd_bench)
    p.add_argument("what", choices=BENCHMARKS, help="train: naive vs optimised training step; eval: full ranking "
                   "vs a raw matmul+top-K floor; serve: HTTP latency under concurrent load; epoch: one epoch of a "
                   "real domain (--domain) with the real-data recipe; encode: catalogue encoding throughput "
                   "(items/s) of the default encoders, and a restart from the vector store; recall: recall@10 of "
                   "the approximate indexes (hnsw, ivf) against exact search; start: `pmmrec serve`'s time to the first "
                   "answer, cold (no vector store) and restarting with the vectors stored")
    p.add_argument("--domain", help="epoch: the prepared domain to train on (e.g. data/ml1m)")
    p.add_argument("--variant", nargs="+", choices=["sasrec", "multimodal"],
                   help="epoch: which models (default: both)")
    p.add_argument("-c", "--config", help="epoch: the recipe (default: configs/real-cpu.yaml of this checkout)")
    p.add_argument("--out", help="JSON file for the results (default: bench-WHAT.json)")
    p.add_argument("--quick", action="store_true", help="small sizes, done in seconds (for tests)")
    p.add_argument("--items", type=int, help="serve, recall, start: catalogue size (default 100000; --quick 5000, "
                   "start 120)")
    p.add_argument("--index", choices=["auto", "exact", "hnsw", "ivf"],
                   help="serve: how the server searches, as `pmmrec serve --index` (default auto); recall: the "
                        "index to measure (default hnsw and ivf)")
    p.add_argument("--catalogue", choices=["random", "clustered"],
                   help="serve, recall: synthetic item vectors, random (default for serve) or clustered (nearer to "
                        "trained ones); recall: default both")
    p.add_argument("--cold-items", type=int, metavar="N",
                   help="start: measure the cold start on N items and extrapolate it to --items (default 1000; "
                        "equal to --items: measured directly)")
    p.add_argument("--restarts", type=int, metavar="N", help="start: restarts timed (default 3)")
    p.add_argument("--image-size", type=int, metavar="PX", help="start: side of the generated pictures (default 64)")
    p.add_argument("--work", metavar="DIR", help="start: keep the generated catalogues and checkpoint in DIR and "
                   "reuse them next time (default: a temporary folder); serve: keep the approximate index in "
                   "DIR/index and read it back next time (a million items: minutes of building saved)")
    p.add_argument("--ef-search", type=int, metavar="N",
                   help="serve: hnsw's candidate list per search, as `pmmrec serve --ef-search` (default 512)")
    p.add_argument("--nprobe", type=int, metavar="N",
                   help="serve: ivf's lists visited per search, as `pmmrec serve --nprobe` (default 64)")
    p.add_argument("--workers", type=int,
                   help="serve: worker processes sharing one vector store of the catalogue, as `pmmrec serve "
                        "--workers N` (default 1); the JSON reports each one's memory")
    p.add_argument("--sweep", action="store_true",
                   help="recall: also measure each index at several search efforts (efSearch, nprobe)")


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
    p.add_argument("--out", metavar="DIR", help="also write DIR/report.md, report.json and report.png "
                   "(with --curve: curve.md, curve.json, curve.png)")
    p.add_argument("--curve", action="store_true",
                   help="a learning curve instead of a table: test NDCG@10 against the users each run trained on "
                   "(results.json's num_users), one line per kind of run (scratch, transfer full, zero-shot...), "
                   "runs of the same kind and size averaged (e.g. seeds); for targets subsampled with "
                   "`pmmrec data sample`")
    p.add_argument("--by", choices=["kind", "name"], default="kind",
                   help="--curve: one line per kind of run (default), or per run folder name (studies laid out as "
                   "SIZE-SEED/VARIANT folders, e.g. scripts/transfer_study.py)")
