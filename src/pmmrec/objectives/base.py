"""What an objective is: a term computed from one step's outputs, plus the heads it owns (docs/design.md §5).

An :class:`Objective` names its config section (``objectives.<section>``), builds the small trainable heads it
needs (the model owns them, so they are saved, moved and wrapped with it) and computes its term from
:class:`StepOutputs` and the batch. The training loop sums ``objectives.weights[name] * term`` over the
objectives in ``objectives.use``; nothing else knows an objective by name. The built-in ones are listed in
:mod:`pmmrec.objectives.registry`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pmmrec.config import Config, ObjectivesConfig
from pmmrec.data.datasets import SequenceBatch
from pmmrec.objectives.corruption import corrupt

__all__ = ["Objective", "StepOutputs", "no_heads"]


@dataclass
class StepOutputs:
    """One training step's tensors, computed once and shared by every objective's term.

    ``model`` is the PMMRec being trained (terms reach its ``heads`` and ``encode_sequences``); the step's
    settings (``config``, ``log_pop``, ``gather_negatives``, ``noise_seed``) are set by the training loop.
    """

    model: Any  # PMMRec (typed loosely: objectives sit below models, docs/design.md §12)
    tokens: Any  # ModalityTokens of the batch's distinct items, or None for the ID tower
    unique_embs: Tensor  # (U, D) vectors of the batch's distinct items
    item_embs: Tensor  # (B, L+1, D) every slot's vector (gathered from unique_embs)
    states: Tensor  # (B, L, D) user encoder states of the clean sequences
    mask: Tensor  # (B, L) True at real (non-padding) input positions
    config: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    log_pop: Tensor | None = None  # (N+1,) log training popularity for the logQ correction, or None
    gather_negatives: bool = True  # under torchrun: L_rec's candidates are every rank's slots
    noise_seed: int = 0  # seeds the corruption of L_NID/L_RCL: deterministic per (seed, epoch, batch, rank)
    step_seed: int = 0  # seeds draws every rank must share (sampled negatives): per (seed, epoch, batch)
    # Item numbers (k,) -> their vectors (k, D) with gradients, through the model's item encoder; None -> the whole
    # catalogue (N+1, D), row 0 = padding. Set by the training loop for the catalogue-wide L_rec.
    item_vectors: Callable[[Tensor | None], Tensor] | None = None
    num_items: int = 0  # N, the catalogue's size
    sample_log_q: Tensor | None = None  # (N+1,) log of the distribution sampled negatives are drawn from; None = uniform
    _corrupted: tuple[Tensor, Tensor] | None = None

    def corrupted(self, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
        """``(noisy_states (B, L, D), changed (B, L) bool)``: the user encoder's states on the corrupted view of
        the batch's sequences, computed once and shared by L_NID and L_RCL."""
        if self._corrupted is None:
            generator = torch.Generator().manual_seed(self.noise_seed)
            corrupted, changed = corrupt(batch.items[:, :-1], self.config.nid.ratio, generator,
                                         self.config.nid.shuffle)
            # Replacements come from the batch's own items, whose vectors are already computed.
            noisy = self.unique_embs[torch.searchsorted(batch.unique, corrupted.to(batch.unique.device))]
            self._corrupted = (self.model.encode_sequences(noisy, self.mask), changed.to(self.mask.device))
        return self._corrupted


def no_heads(config: Config, item_encoder: nn.Module) -> dict[str, nn.Module]:
    return {}


@dataclass(frozen=True)
class Objective:
    """One training objective.

    Args:
        name: the name used in ``objectives.use`` and ``objectives.weights``.
        term: ``term(outputs, batch) -> scalar Tensor``: the objective's value on the batch (under torchrun,
            this rank's share, such that DDP's gradient average is the gradient of the global objective).
        heads: ``heads(config, item_encoder) -> {name: module}``: the trainable heads the term reads from
            ``outputs.model.heads``; may raise :class:`~pmmrec.errors.ConfigError` when the model cannot serve
            the objective (e.g. NICL without both modalities).
        section: the objective's settings section in ``ObjectivesConfig`` (``objectives.<section>``), if any.
    """

    name: str
    term: Callable[[StepOutputs, SequenceBatch], Tensor]
    heads: Callable[[Config, nn.Module], dict[str, nn.Module]] = no_heads
    section: str | None = None
