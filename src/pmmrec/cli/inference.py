"""``pmmrec evaluate``, ``recommend``, ``export-embeddings`` and ``serve``: a trained checkpoint at work."""

from __future__ import annotations

import argparse
import json
import logging

from pmmrec.cli.common import _command, _print_results, _prints
from pmmrec.errors import PmmrecError

log = logging.getLogger("pmmrec")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from pmmrec.evaluation.checkpoint import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, args.overrides, splits=args.split, out=args.out)
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
                                              unknown_items="reject" if args.strict else "skip",
                                              store=_store_arg(args), embeddings=args.embeddings)
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
    from pmmrec.inference.export import export_store

    done = export_store(args.checkpoint, args.out, args.domain, args.overrides, args.faiss, args.faiss_kind)
    if done is not None and _prints():
        print(f"wrote {done.count} item vectors of dimension {done.dim} to the vector store {done.store} "
              f"(version {done.version}: {done.encoded} encoded, {done.reused} reused)"
              + (f", faiss index to {done.index}" if done.index else ""))


def cmd_serve(args: argparse.Namespace) -> None:
    from pmmrec.serving.server import serve

    options = {name: value for name, value in (("exact_max_items", args.exact_max_items),
                                               ("hnsw_ef_search", args.ef_search), ("ivf_nprobe", args.nprobe))
               if value is not None}
    serve(args.checkpoint, host=args.host, port=args.port, workers=args.workers, domain=args.domain,
          threads=args.threads, persist_items=args.persist_items, compare=args.compare, store=_store_arg(args),
          embeddings=args.embeddings, index=args.index, index_options=options)


def _store_arg(args: argparse.Namespace) -> str | None:
    """``store=`` of Recommender.from_checkpoint: ``"auto"`` (beside the checkpoint), a folder, or None."""
    if args.no_store and args.store:
        raise PmmrecError("--store and --no-store contradict each other: give one")
    if args.embeddings and (args.store or args.no_store):
        raise PmmrecError("--embeddings serves that store as is: --store and --no-store do not apply")
    return None if args.no_store else (args.store or "auto")


def _add_store_options(p) -> None:
    p.add_argument("--store", metavar="DIR",
                   help="the catalogue's vector store: item vectors reused across starts, only new or changed items "
                        "encoded (default: beside the checkpoint, CHECKPOINT_NAME.vectors/DOMAIN-HASH)")
    p.add_argument("--no-store", action="store_true",
                   help="encode the whole catalogue at start and keep no vector store")
    p.add_argument("--embeddings", metavar="DIR",
                   help="serve the vector store written by `pmmrec export-embeddings --out DIR` as the catalogue, "
                        "as is (it must come from this checkpoint); titles and images from --domain, or the "
                        "checkpoint's data.domain when it is there")


def _add_inference_commands(sub) -> None:
    """``pmmrec evaluate``, ``recommend``, ``export-embeddings`` and ``serve``: a trained checkpoint at work."""
    p = _command(sub, "evaluate", "full-ranking evaluation (HR/NDCG/MRR@K, both protocols) of a checkpoint",
                 "pmmrec evaluate --checkpoint runs/tiny/checkpoints/best.pt [data.domain=OTHER_DOMAIN]",
                 cmd_evaluate)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train/pretrain/transfer")
    p.add_argument("--split", choices=["valid", "test"], action="append",
                   help="which split(s) to evaluate (default: both)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--out", metavar="DIR", help="also write DIR/results.json and DIR/config.yaml, a run folder "
                   "for `pmmrec report` (zero-shot when data.domain is a domain the checkpoint never trained on)")
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
    _add_store_options(p)
    p = _command(sub, "export-embeddings",
                 "write the catalogue's item vectors as a vector store (float32 .npy, ids, content digests), "
                 "optionally a faiss index; under torchrun the catalogue is shared out to the processes",
                 "pmmrec export-embeddings --checkpoint runs/x/checkpoints/best.pt --out runs/x/items "
                 "[--faiss items.faiss]  (parallel: torchrun --nproc_per_node 4 -m pmmrec export-embeddings ...)",
                 cmd_export_embeddings)
    p.add_argument("--checkpoint", required=True, help="a checkpoint written by train/pretrain/transfer")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the vector store folder (new, empty, or a store to bring up to date: only items new or "
                        "changed since are encoded); `pmmrec serve --embeddings DIR` serves it")
    p.add_argument("--domain", help=domain_help)
    p.add_argument("--faiss", metavar="FILE", help="also write an inner-product faiss index (needs faiss-cpu)")
    p.add_argument("--faiss-kind", choices=["hnsw", "flat"], default="hnsw",
                   help="hnsw: approximate, for large catalogues (default); flat: exact")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the checkpoint's config, e.g. train.device=cuda eval.batch_size=512 "
                        "data.missing_image=blank")
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
                   help="worker processes (default 1); they share the catalogue's vector store, memory-mapped, "
                        "and an item posted to one is served by all within a second")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per scoring batch (default 1: concurrent requests are scored in batches, "
                        "one batch per core at a time)")
    p.add_argument("--domain", help=domain_help)
    p.add_argument("--persist-items", action="store_true",
                   help="write items added through POST /items into the domain folder (items.tsv, images.lmdb) "
                        "and, with --embeddings, into that vector store")
    p.add_argument("--compare", metavar="CHECKPOINT",
                   help="a second checkpoint shown side by side on the explorer page (e.g. scratch vs transferred), "
                        "over the same catalogue")
    _add_store_options(p)
    p.add_argument("--index", choices=["auto", "exact", "hnsw", "ivf"], default="auto",
                   help="top-K search: exact scores every item; hnsw or ivf take candidates from a faiss index "
                        "(needs faiss-cpu) and re-rank them exactly, history still excluded; auto (default): exact "
                        "up to --exact-max-items items, hnsw above")
    p.add_argument("--exact-max-items", type=int, default=None, metavar="N",
                   help="--index auto: the largest catalogue scored exactly (default 500000: below it exact "
                        "scoring costs less than hnsw at its defaults on 2 cores; check yours with `pmmrec bench serve "
                        "--items N --index exact|hnsw`)")
    p.add_argument("--ef-search", type=int, default=None, metavar="N",
                   help="hnsw: candidate list per search (default 512; higher: better recall, slower)")
    p.add_argument("--nprobe", type=int, default=None, metavar="N",
                   help="ivf: lists visited per search (default 64; higher: better recall, slower)")
