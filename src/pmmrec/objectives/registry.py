"""The registry of training objectives: adding one is a new file in this package plus one line here.

``objectives.use`` names entries of :data:`OBJECTIVES`; the model builds their heads
(:func:`build_heads`) and the training loop sums their terms, in registry order. An extension registers its
own :class:`~pmmrec.objectives.base.Objective` with :func:`register` before building a model.
"""

from __future__ import annotations

import dataclasses
import difflib

from torch import nn

from pmmrec.config import Config, ObjectivesConfig
from pmmrec.errors import ConfigError
from pmmrec.objectives import next_item, nicl, nid, rcl
from pmmrec.objectives.base import Objective

__all__ = ["OBJECTIVES", "build_heads", "in_use", "register"]

OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add ``objective`` to the registry (its name must be new, its config section must exist)."""
    if objective.name in OBJECTIVES:
        raise ValueError(f"an objective named {objective.name!r} is already registered")
    sections = {f.name for f in dataclasses.fields(ObjectivesConfig)}
    if objective.section is not None and objective.section not in sections:
        raise ValueError(f"objective {objective.name!r} declares the config section objectives.{objective.section}, "
                         "which ObjectivesConfig does not have")
    OBJECTIVES[objective.name] = objective
    return objective


register(next_item.OBJECTIVE)
register(nicl.OBJECTIVE)
register(nid.OBJECTIVE)
register(rcl.OBJECTIVE)


def in_use(cfg: ObjectivesConfig) -> list[Objective]:
    """The objectives of ``objectives.use``, in registry order; unknown names are a ConfigError."""
    for key, names in (("objectives.use", cfg.use), ("objectives.weights", list(cfg.weights))):
        unknown = [name for name in names if name not in OBJECTIVES]
        if unknown:
            match = difflib.get_close_matches(unknown[0], list(OBJECTIVES), n=1, cutoff=0.5)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"{key} names unknown objective(s) {unknown}{hint}; registered: {list(OBJECTIVES)}")
    return [objective for name, objective in OBJECTIVES.items() if name in cfg.use]


def build_heads(config: Config, item_encoder: nn.Module) -> nn.ModuleDict:
    """Every head of the objectives in use (saved with the model, never transferred: they serve training)."""
    heads = nn.ModuleDict()
    for objective in in_use(config.objectives):
        for name, head in objective.heads(config, item_encoder).items():
            heads[name] = head
    return heads
