"""What the CLI's command groups share: the common options, the command and config helpers, the results table.

Imports nothing heavy and no other module of :mod:`pmmrec.cli`, so every group module can import it.
"""

from __future__ import annotations

import argparse
import os

EPILOG_CONFIG = ("Overrides are dotted.key=value words after the options (or among them; in order, the last wins), "
                 "e.g. model.fusion=sum train.epochs=3; "
                 "`pmmrec config show -c FILE` prints every key with its resolved value.")


def _example(text: str) -> str:
    return f"example:\n  {text}\n\n{EPILOG_CONFIG}" if "-c " in text else f"example:\n  {text}"


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


def _config_args(p: argparse.ArgumentParser, resume: bool = False) -> None:
    """``-c/--config`` and the ``key=value`` overrides; with ``resume``, ``--resume`` before them."""
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="continue from run.dir/checkpoints/last.pt exactly where it stopped")
    p.add_argument("-c", "--config", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3")


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
