"""Checkpoints: one dict per file, written atomically, loaded with ``weights_only=True`` (docs/design.md §6, §13).

A checkpoint holds everything needed to resume exactly (model, optimiser, scheduler, grad scaler, RNG states,
epoch, step within the epoch, best metric and patience counter) or to rebuild the model (the resolved config
and the item id map). Everything is stored as tensors, dicts, lists, strings and numbers, so loading never
unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pmmrec import __version__
from pmmrec.errors import PmmrecError
from pmmrec.utils.io import atomic_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as plain lists/tensors (safe for weights_only loading)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_TRAILER = b"\nPMMREC-SHA256:"  # followed by the 64 hex digits of the SHA-256 of everything before it


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the file it replaces: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Write ``state`` atomically, ending with a SHA-256 of the payload so corruption is detected on load.

    The checksum lives inside the same file (not beside it), so no crash can pair a new file with an old sum.
    ``keep_previous``: the file being replaced survives as :func:`previous_path` (a hard link, so ``path``
    exists at every instant), the fallback when the new file is later found corrupted.
    """
    payload = {"format_version": FORMAT_VERSION, "pmmrec_version": __version__, **state}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    path = Path(path)
    if keep_previous and path.is_file():
        prev = previous_path(path)
        link = prev.with_name(f".{prev.name}.link.tmp")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        try:
            os.link(path, link)
        except OSError:  # a filesystem without hard links: copy (atomically) instead
            shutil.copyfile(path, link)
        os.replace(link, prev)
    with atomic_file(path, "wb") as f:
        f.write(data)
        f.write(_TRAILER + hashlib.sha256(data).hexdigest().encode("ascii"))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a checksum mismatch or unreadable file is an error."""
    path = Path(path)
    if not path.is_file():
        raise PmmrecError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    cut = len(raw) - len(_TRAILER) - 64
    if cut >= 0 and raw[cut:cut + len(_TRAILER)] == _TRAILER:
        data = raw[:cut]
        if hashlib.sha256(data).hexdigest().encode("ascii") != raw[cut + len(_TRAILER):]:
            raise PmmrecError(f"{path}: checksum mismatch (the file is truncated or corrupted)")
    else:
        data = raw  # a plain torch.save file (e.g. written by another tool): loadable, but not verifiable
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean "not a loadable checkpoint"
        raise PmmrecError(f"{path}: not a loadable pmmrec checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise PmmrecError(f"{path}: not a pmmrec checkpoint (no format_version)")
    if state["format_version"] > FORMAT_VERSION:
        raise PmmrecError(f"{path}: written by a newer pmmrec (format {state['format_version']}); upgrade pmmrec")
    return state


def load_resume_checkpoint(candidates: list[Path],
                           map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any]] | None:
    """The resume point among a run's checkpoints: the loadable one with the most optimiser updates.

    Every checkpoint of a run holds the complete state at its step (``best.pt`` and ``last.pt`` written at
    one evaluation are the same state), and training is a deterministic function of that state, so resuming
    from any of them replays to the same final result; the latest merely replays the least. A candidate that
    exists but fails its checksum or cannot be read is logged as an error naming the file, and skipped.
    Ties go to the earlier candidate. None when no candidate exists; a PmmrecError when all that exist are bad.
    """
    found, problems = [], []
    for path in candidates:
        if not path.is_file():
            continue
        try:
            state = load_checkpoint(path, map_location)
            update = int(state["trainer_state"]["update"])
        except (PmmrecError, KeyError, TypeError, ValueError) as e:
            reason = str(e) if isinstance(e, PmmrecError) else f"{path}: no trainer_state.update ({e})"
            problems.append(reason)
            log.error("%s; falling back to an earlier checkpoint", reason)
            continue
        found.append((update, -len(found), path, state))
    if found:
        update, _, path, state = max(found, key=lambda f: (f[0], f[1]))
        if problems:
            log.warning("resuming from %s (step %d) instead", path, update)
        return path, state
    if problems:
        raise PmmrecError(f"no usable checkpoint to resume from: {'; '.join(problems)}")
    return None


def load_best_model(best: Path, last: Path, update: int) -> dict[str, Any]:
    """``best``'s model weights; if ``best`` is corrupted, the same weights from ``last`` or its predecessor when
    one of them was written at the same evaluation (the same optimiser ``update``), else the checksum error."""
    try:
        return load_checkpoint(best)["model"]
    except PmmrecError as e:
        for path in (last, previous_path(last)):
            if path.is_file():
                with contextlib.suppress(PmmrecError):
                    state = load_checkpoint(path)
                    if state["trainer_state"]["update"] == update:
                        log.error("%s; using %s, written at the same step %d", e, path, update)
                        return state["model"]
        raise
