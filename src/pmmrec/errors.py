"""User-facing errors.

Every error a user can cause (bad data, bad config, bad command line) is a :class:`PmmrecError`. The CLI prints
it as one line and exits non-zero; ``--debug`` shows the traceback. Anything else is a bug in pmmrec.
"""

from __future__ import annotations

import os


class PmmrecError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


class ConfigError(PmmrecError):
    """A configuration file or override is invalid."""


class DataError(PmmrecError):
    """A data file is invalid. The message names the file, and the line and field when known."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = []
        if path is not None:
            where.append(f"{path}" + (f":{line}" if line is not None else ""))
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class NotImplementedYet(PmmrecError):
    """A command of the product that a later release implements."""
