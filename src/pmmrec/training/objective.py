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

import numpy as np
import torch
from torch import Tensor, nn

from pmmrec.config import Config
from pmmrec.data.batch import ItemInputs
from pmmrec.data.datasets import SequenceBatch
from pmmrec.data.item_features import ItemFeatureStore
from pmmrec.errors import ConfigError
from pmmrec.objectives import log_popularity
from pmmrec.objectives.registry import in_use
from pmmrec.runtime import distributed


class TrainingObjective(nn.Module):
    """``forward(batch, noise_seed) -> {objective name: term}`` for the objectives in ``objectives.use``."""

    def __init__(self, model: nn.Module, config: Config, log_pop: Tensor | None, amp_dtype: torch.dtype | None,
                 store: ItemFeatureStore | None = None, train_counts: np.ndarray | None = None):
        """``log_pop``: the logQ term of in-batch L_rec (None: off). ``store`` and ``train_counts`` (the training
        popularity): the catalogue that a catalogue-wide or sampled L_rec encodes candidates from."""
        super().__init__()
        self.model = model
        self.cfg = config.objectives
        self.objectives = in_use(self.cfg)
        self.gather_negatives = config.train.gather_negatives
        self.log_pop = log_pop  # a plain attribute, not a buffer: DDP has nothing to broadcast
        self.amp_dtype = amp_dtype
        self.store = store
        self.num_items = len(train_counts) - 1 if train_counts is not None else 0
        rec = self.cfg.rec
        if "rec" in self.cfg.use and rec.negatives != "in_batch" and train_counts is None:
            raise ValueError(f"objectives.rec.negatives={rec.negatives} needs the catalogue (train_counts)")
        if "rec" in self.cfg.use and rec.negatives == "sampled" and rec.num_negatives > self.num_items:
            raise ConfigError(f"objectives.rec.num_negatives={rec.num_negatives} is larger than the catalogue "
                              f"({self.num_items} items): use objectives.rec.negatives=catalogue, or fewer negatives")
        self.sample_log_q = None
        if rec.negatives == "sampled" and rec.sampling == "popularity":
            log_q = log_popularity(train_counts) * rec.alpha  # (N+1,) log count**alpha, up to a constant
            log_q[1:] = torch.log_softmax(log_q[1:], dim=0)
            log_q[0] = 0.0
            self.sample_log_q = log_q  # on the CPU: the sampler draws there, the loss moves it
        self._catalogue_inputs: ItemInputs | None = None

    def _item_vectors(self, numbers: Tensor | None) -> Tensor:
        """Vectors (with gradients) of items ``numbers`` (k,), or of the whole catalogue (N+1, D) for None."""
        device = next(self.model.parameters()).device
        if numbers is None:
            if self._catalogue_inputs is None:  # the catalogue's inputs (cached features) stay on the device
                self._catalogue_inputs = self._lookup(torch.arange(1, self.num_items + 1)).to(device)
            vectors = self.model.encode_items(self._catalogue_inputs)  # (N, D)
            return torch.cat([vectors.new_zeros(1, vectors.shape[1]), vectors])
        return self.model.encode_items(self._lookup(numbers.cpu()).to(device))

    def _lookup(self, numbers: Tensor) -> ItemInputs:
        return self.store.lookup(numbers) if self.store is not None else ItemInputs(items=numbers)

    def forward(self, batch: SequenceBatch, noise_seed: int, step_seed: int = 0) -> dict[str, Tensor]:
        device = batch.items.device
        autocast = (torch.autocast(device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            out = self.model(batch)
            out.config, out.log_pop = self.cfg, self.log_pop
            out.gather_negatives, out.noise_seed, out.step_seed = self.gather_negatives, noise_seed, step_seed
            out.item_vectors, out.num_items, out.sample_log_q = self._item_vectors, self.num_items, self.sample_log_q
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
