"""Evaluate a model with full ranking: encode the catalogue once, then score users in chunks (docs/design.md §7).

Each catalogue item is encoded exactly once per evaluation through the one ``ItemEncoder``; a user's vector is
the user encoder's state at the last position of their input, built from those same item vectors (no item is
re-encoded per user). Ranking and metrics come from :mod:`pmmrec.evaluation.ranking`.

Under torchrun (a process group is initialised) the work is sharded and the result is the one process's,
bit for bit: catalogue chunks and user chunks (``eval.batch_size`` each, the very chunks one process uses, so
every vector comes from the same arithmetic) are dealt to the ranks in turn, the item vectors are summed across
ranks (each row is non-zero on one rank only, so the sum is exact), and the per-user ranks (integers) are
gathered and put back in user order before the metrics are computed, identically on every rank.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pmmrec.config import EvalConfig
from pmmrec.data.batch import ItemInputs
from pmmrec.data.datasets import EvalSequences
from pmmrec.data.item_features import ItemFeatureStore
from pmmrec.data.sources import DomainView
from pmmrec.evaluation.metrics import metrics_from_ranks
from pmmrec.evaluation.ranking import PROTOCOLS, rank_targets
from pmmrec.models.pmmrec import PMMRec
from pmmrec.runtime import distributed


def _my_chunks(total: int, size: int, start: int = 0) -> list[tuple[int, int]]:
    """The ``[begin, end)`` chunks of ``start..start+total`` (``size`` each) that this rank handles: every
    ``world``-th one, from its rank on (all of them in one process)."""
    chunks = [(b, min(b + size, start + total)) for b in range(start, start + total, size)]
    return chunks[distributed.rank()::distributed.world_size()]


@torch.no_grad()
def encode_catalogue(model: PMMRec, store: ItemFeatureStore | None, num_items: int, device: torch.device,
                     batch_size: int = 256, progress: bool = False) -> Tensor:
    """(N+1, D) vectors of items 0..N; row 0 (padding) is zero. Under torchrun each rank encodes its share of
    the chunks and every rank returns the whole table."""
    if distributed.world_size() > 1:
        out = torch.zeros(num_items + 1, model.item_encoder.dim, device=device)
        for begin, end in tqdm(_my_chunks(num_items, batch_size, start=1), desc="encode items",
                               disable=not progress or not distributed.is_main(), leave=False):
            items = np.arange(begin, end)
            inputs = store.lookup(items) if store is not None else ItemInputs(items=torch.from_numpy(items))
            out[begin:end] = model.encode_items(inputs.to(device)).float()
        return distributed.all_reduce_sum(out)  # exact: each row is non-zero on one rank only
    chunks = [torch.zeros(1, model.item_encoder.dim, device=device)]
    starts = range(1, num_items + 1, batch_size)
    for start in tqdm(starts, desc="encode items", disable=not progress, leave=False):
        items = np.arange(start, min(start + batch_size, num_items + 1))
        inputs = store.lookup(items) if store is not None else ItemInputs(items=torch.from_numpy(items))
        chunks.append(model.encode_items(inputs.to(device)).float())
    return torch.cat(chunks)


@torch.no_grad()
def user_vectors(model: PMMRec, item_vecs: Tensor, inputs: Tensor, batch_size: int = 256) -> Tensor:
    """(U, L) left-padded inputs -> (U, D) user vectors (the state at the last position)."""
    out = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size].to(item_vecs.device)  # (b, L)
        states = model.encode_sequences(item_vecs[chunk], chunk != 0)  # (b, L, D)
        out.append(states[:, -1].float())
    return torch.cat(out) if out else item_vecs.new_zeros(0, item_vecs.shape[1])


@torch.no_grad()
def evaluate(model: PMMRec, item_vecs: Tensor, sequences: EvalSequences, cfg: EvalConfig,
             candidates: Tensor | None = None) -> dict:
    """Metrics under both protocols, ``{"exclude_history": {"HR@10": ...}, "include_history": {...}}``.

    ``candidates`` (item numbers) restricts the ranking to a sub-catalogue, e.g. one domain of a merged
    pretraining catalogue; the users' inputs are still read through the full ``item_vecs``.
    """
    was_training = model.training
    model.eval()
    try:
        # This rank's users (all of them in one process), in whole chunks of eval.batch_size.
        index = torch.cat([torch.arange(b, e) for b, e in _my_chunks(len(sequences), cfg.batch_size)]
                          or [torch.zeros(0, dtype=torch.long)])
        users = user_vectors(model, item_vecs, sequences.inputs[index], cfg.batch_size)
        targets = sequences.targets[index].to(item_vecs.device)
        histories = [sequences.histories[i].to(item_vecs.device) for i in index.tolist()]
        if candidates is not None:
            candidates = candidates.to(item_vecs.device)
            local = torch.zeros(len(item_vecs), dtype=torch.long, device=item_vecs.device)  # merged -> local number
            local[candidates] = torch.arange(1, len(candidates) + 1, device=item_vecs.device)
            item_vecs = torch.cat([item_vecs[:1], item_vecs[candidates]])  # (C+1, D), row 0 = padding
            targets = local[targets]
            if bool((targets == 0).any()):
                raise ValueError("a target item lies outside the candidate catalogue")
            histories = [local[h][local[h] > 0] for h in histories]
        ranks = rank_targets(users, item_vecs, targets, histories, user_chunk=cfg.batch_size,
                             item_chunk=cfg.item_chunk)  # {protocol: (u,)}; u may be 0 on some rank
        if distributed.world_size() > 1:
            order = torch.cat(distributed.all_gather_varlen(index.to(item_vecs.device))).argsort()
            ranks = {p: torch.cat(distributed.all_gather_varlen(r))[order] for p, r in ranks.items()}
        return {protocol: metrics_from_ranks(ranks[protocol], cfg.ks) for protocol in PROTOCOLS}
    finally:
        model.train(was_training)


def mean_over_domains(per_domain: dict[str, dict]) -> dict:
    """Average each metric of each protocol over domains (every domain weighs the same)."""
    first = next(iter(per_domain.values()))
    return {protocol: {name: float(sum(d[protocol][name] for d in per_domain.values()) / len(per_domain))
                       for name in first[protocol]} for protocol in first}


class SplitEvaluator:
    """Full-ranking evaluation of a model on one domain's validation and test sequences, with no trainer.

    With ``views`` (merged source domains, pretraining) each domain's users are ranked against that domain's
    catalogue only; the metrics returned are the mean over domains, and each domain's are kept in
    ``per_domain[split]``.
    """

    def __init__(self, store: ItemFeatureStore | None, num_items: int, valid: EvalSequences, test: EvalSequences,
                 cfg: EvalConfig, device: torch.device, views: list[DomainView] | None = None):
        self.store, self.num_items, self.cfg, self.device, self.views = store, num_items, cfg, device, views
        self.sequences = {"valid": valid, "test": test}
        self.per_domain: dict[str, dict] = {}

    def catalogue(self, model: PMMRec) -> Tensor:
        """(N+1, D) vectors of every item, each encoded once with the model's current weights."""
        model.eval()
        return encode_catalogue(model, self.store, self.num_items, self.device, self.cfg.batch_size)

    def evaluate(self, model: PMMRec, which: str = "valid", item_vecs: Tensor | None = None) -> dict:
        """Metrics on ``which`` (valid or test); ``item_vecs`` (from :meth:`catalogue`) lets several splits share
        one encoding of the catalogue."""
        item_vecs = self.catalogue(model) if item_vecs is None else item_vecs
        sequences = self.sequences[which]
        if self.views is None:
            return evaluate(model, item_vecs, sequences, self.cfg)
        self.per_domain[which] = {
            view.name: evaluate(model, item_vecs, sequences.subset(view.users), self.cfg,
                                candidates=torch.from_numpy(view.items)) for view in self.views}
        return mean_over_domains(self.per_domain[which])
