"""The ``pmmrec`` command line. Each command parses its arguments and calls one library function.

User errors (:class:`pmmrec.errors.PmmrecError`) print one line and exit with status 2; ``--debug`` shows the
traceback. Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.

One module per command group holds that group's parser builder(s) and its ``cmd_*`` handlers: :mod:`.data`,
:mod:`.training`, :mod:`.inference` and :mod:`.tools`; :mod:`.common` holds what they share.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pmmrec import __version__
from pmmrec.cli.common import _common_options
from pmmrec.cli.data import _add_data_commands
from pmmrec.cli.inference import _add_inference_commands
from pmmrec.cli.tools import _add_bench_command, _add_misc_commands
from pmmrec.cli.training import _add_training_commands
from pmmrec.errors import PmmrecError
from pmmrec.utils.malloc import tune_malloc

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may also follow an option (`pretrain -c R a=1 --objectives rec b=2`): argparse gives the
    # positional list only the run before the first option, so the later ones come back unparsed and join it here,
    # in order. Anything else left over is still an error.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *extra]
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
