"""``pmmrec bench``: measurements written as JSON, compared as ratios taken in the same run (docs/design.md §9).

One module per benchmark (``train``, ``eval``, ``serve``), each with ``run(args)`` called by the CLI.
"""
