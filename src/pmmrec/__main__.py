"""``python -m pmmrec`` (and ``torchrun -m pmmrec``) runs the CLI."""

import sys

from pmmrec.cli import main

sys.exit(main())
