"""``pmmrec config show``, ``pretrain``, ``transfer``, ``train`` and ``baseline``."""

from __future__ import annotations

import argparse
from dataclasses import replace

from pmmrec.cli.common import _command, _common_options, _config_args, _objectives, _print_results, _prints
from pmmrec.errors import PmmrecError


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

    explicit = args.objectives is not None
    config = load_config(args.config, [*args.overrides, _objectives(args)] if explicit else args.overrides)
    if not explicit:  # the recipe's objectives.pretrain (all four unless the recipe says otherwise)
        config = replace(config, objectives=replace(config.objectives, use=list(config.objectives.pretrain)))
    results = pretrain(config, resume=args.resume)
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


def cmd_baseline(args: argparse.Namespace) -> None:
    from pmmrec.config import load_config

    if args.name == "pop":
        from pmmrec.evaluation.baselines import run_most_popular

        _print_results(run_most_popular(load_config(args.config, args.overrides)))
    else:  # ID-based SASRec: a model like the others, trained from scratch
        from pmmrec.training import train

        overrides = [*args.overrides, "model.item_tower=id", "model.user_encoder=sasrec"]
        _print_results(train(load_config(args.config, overrides), resume=getattr(args, "resume", False)))


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
    p.add_argument("--objectives", metavar="LIST",
                   help="pretraining objectives, any subset of rec,nicl,nid,rcl (default: the recipe's "
                        "objectives.pretrain: all four, the PMMRec model, except in the real-data recipes, which "
                        "pretrain with rec alone; nicl needs the multimodal item tower). Weights: "
                        "objectives.weights.NAME=W")
    _config_args(p, resume=True)
    p = _command(sub, "transfer", "fine-tune a pretrained checkpoint on a target domain, by part and modality",
                 "pmmrec transfer -c configs/cpu.yaml --from runs/pretrain/checkpoints/best.pt "
                 "transfer.parts=item_encoder data.domain=data/world/target run.dir=runs/transfer", cmd_transfer)
    p.add_argument("--objectives", metavar="LIST", help="fine-tuning objectives (default: objectives.use, i.e. rec)")
    p.add_argument("--from", dest="checkpoint", help="the pretrained checkpoint (its text/vision/model settings "
                   "are used unless the recipe or overrides change them). The model it initialises is validated "
                   "before the first step (step 0) and is the result if fine-tuning never beats it")
    _config_args(p, resume=True)
    base = sub.add_parser("baseline", help="reference points on one domain, in the same harness and run folders",
                          parents=[_common_options()])
    bsub = base.add_subparsers(dest="name", metavar="BASELINE", required=True)
    p = _command(bsub, "pop", "most popular: every user gets the items ranked by training popularity",
                 "pmmrec baseline pop -c configs/cpu.yaml data.domain=data/world/target run.dir=runs/pop",
                 cmd_baseline)
    _config_args(p)
    p = _command(bsub, "sasrec", "SASRec over item IDs (model.item_tower=id), trained from scratch",
                 "pmmrec baseline sasrec -c configs/cpu.yaml data.domain=data/world/target run.dir=runs/sasrec",
                 cmd_baseline)
    _config_args(p, resume=True)
    p = _command(sub, "train", "train from scratch on one domain (any item tower); writes run.dir",
                 "pmmrec train -c configs/tiny.yaml data.domain=data/world/target run.dir=runs/tiny", cmd_train)
    p.add_argument("--objectives", metavar="LIST", help="objectives (default: objectives.use, i.e. rec)")
    _config_args(p, resume=True)
