"""The training objective as one module: the model's step outputs, then the weighted sum of the registered terms.

DDP (under torchrun) wraps this module rather than the bare model: DDP arms its gradient hooks in ``forward``,
and the terms reach into the model's parts (item encoder, user encoder, heads), so the whole loss must run inside
one forward call. Which objectives run, and how, is :mod:`pmmrec.objectives.registry`'s business.

What crosses ranks (docs/design.md §6): L_rec gathers every rank's item slots *with gradients* (with
``train.gather_negatives``) and weighs each rank's sum so that DDP's gradient average is the gradient of the mean
over the global batch: N x B/N trains the objective of 1 x B (tested). L_NICL, L_NID and L_RCL run per rank on the
rank's slice (their negatives are that slice's) and DDP averages their gradients.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from pmmrec.config import Config
from pmmrec.data.datasets import SequenceBatch
from pmmrec.objectives.registry import in_use
from pmmrec.runtime import distributed


class TrainingObjective(nn.Module):
    """``forward(batch, noise_seed) -> {objective name: term}`` for the objectives in ``objectives.use``."""

    def __init__(self, model: nn.Module, config: Config, log_pop: Tensor | None, amp_dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.cfg = config.objectives
        self.objectives = in_use(self.cfg)
        self.gather_negatives = config.train.gather_negatives
        self.log_pop = log_pop  # a plain attribute, not a buffer: DDP has nothing to broadcast
        self.amp_dtype = amp_dtype

    def forward(self, batch: SequenceBatch, noise_seed: int) -> dict[str, Tensor]:
        device = batch.items.device
        autocast = (torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = self.model(batch)
            out.config, out.log_pop = self.cfg, self.log_pop
            out.gather_negatives, out.noise_seed = self.gather_negatives, noise_seed
            return {objective.name: objective.term(out, batch) for objective in self.objectives}

    def total(self, parts: dict[str, Tensor]) -> Tensor:
        """``sum(objectives.weights[name] * term)`` (weight 1 for an objective without one)."""
        return sum(self.cfg.weights.get(name, 1.0) * value for name, value in parts.items())

    def logged(self, parts: dict[str, Tensor]) -> dict[str, float]:
        """Each term's value for the logs; under torchrun the global batch's (each term is scaled so that DDP's
        average over ranks is the global value)."""
        if distributed.world_size() == 1:
            return {name: float(value.detach()) for name, value in parts.items()}
        values = distributed.all_reduce_sum(torch.stack([v.detach() for v in parts.values()]))
        return dict(zip(parts, (values / distributed.world_size()).tolist(), strict=True))
