"""Checkpoint -> config -> model -> weights, in one place (evaluate, recommend, serve, transfer, the demo).

A checkpoint (:mod:`pmmrec.runtime.checkpoint`: SHA-256-verified, loaded with ``weights_only=True``) stores the
resolved config and the item ids it was trained on next to the weights. :func:`read_checkpoint` reads and checks
it and rebuilds its config (with optional overrides); :func:`load_model` also rebuilds the model and loads its
weights, verifying a compact checkpoint's omitted frozen encoder weights against their stored digest
(:meth:`PMMRec.load_state_dict`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pmmrec.config import Config, config_from_dict
from pmmrec.errors import PmmrecError
from pmmrec.models.pmmrec import PMMRec
from pmmrec.runtime.checkpoint import load_checkpoint

__all__ = ["Checkpoint", "LoadedModel", "build_model", "id_rows", "load_model", "read_checkpoint"]


@dataclass
class Checkpoint:
    path: str
    state: dict[str, Any]  # everything the file holds (model, optimiser, trainer state, config, item ids, ...)
    config: Config  # the stored config, with the caller's overrides applied
    item_ids: list[str]  # the catalogue the model was trained on, in item-number order


@dataclass
class LoadedModel:
    model: PMMRec  # in eval mode, on the requested device
    config: Config
    item_ids: list[str]
    path: str
    trained_on: list[str] = field(default_factory=list)  # the domain folder(s) of the run, as its config recorded


def read_checkpoint(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Checkpoint:
    """Read a checkpoint and rebuild its config (``overrides`` as on the command line, e.g. ``data.domain=...``)."""
    path = str(path)
    state = load_checkpoint(path)
    for key in ("model", "config", "item_ids"):
        if key not in state:
            raise PmmrecError(f"{path}: not a pmmrec checkpoint (no {key!r} entry)")
    config = config_from_dict(state["config"], overrides, source=f"{path} (stored config)")
    return Checkpoint(path, state, config, [str(i) for i in state["item_ids"]])


def load_model(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
               device: torch.device | str = "cpu") -> LoadedModel:
    """The model of the checkpoint at ``path`` with its weights, in eval mode on ``device``.

    The model is sized for the catalogue it was trained on; a content model (no ID embedding) encodes any
    catalogue, an ID model only that one.
    """
    return build_model(read_checkpoint(path, overrides), device)


def build_model(checkpoint: Checkpoint, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of a checkpoint already read (:func:`read_checkpoint`), as :func:`load_model` returns it."""
    model = PMMRec(checkpoint.config, len(checkpoint.item_ids))
    try:
        model.load_state_dict(checkpoint.state["model"])
    except RuntimeError as e:  # names or shapes differ: the config (with overrides) is not the trained architecture
        raise PmmrecError(f"{checkpoint.path}: its weights do not fit the model its config builds (an override of "
                          f"model, text or vision settings?): {_first_error(e)}") from e
    model.to(device).eval()
    data = checkpoint.state["config"].get("data", {})
    trained_on = [str(d) for d in (data.get("sources") or [data.get("domain")]) if d]
    return LoadedModel(model, checkpoint.config, checkpoint.item_ids, checkpoint.path, trained_on)


def _first_error(e: RuntimeError) -> str:
    """The first specific line of torch's load_state_dict error (its first line only names the module)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0] if lines else ""


def id_rows(trained_ids: list[str], catalogue_ids: list[str]) -> np.ndarray | None:
    """``(N+1,)`` the ID-table row of each catalogue item (0 = an item the model has no ID for), or None when the
    catalogue is the one the model trained on (rows = item numbers). For ``model.item_tower: content+id``."""
    if list(trained_ids) == list(catalogue_ids):
        return None
    row = {item_id: k + 1 for k, item_id in enumerate(trained_ids)}
    return np.array([0, *(row.get(i, 0) for i in catalogue_ids)], dtype=np.int64)
