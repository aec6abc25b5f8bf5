"""Evaluate a model with full ranking: encode the catalogue once, then score users in chunks (DESIGN section 7).

Each catalogue item is encoded exactly once per evaluation through the one ``ItemEncoder``; a user's vector is
the user encoder's state at the last position of their input, built from those same item vectors (no item is
re-encoded per user). Ranking and metrics come from :mod:`pmmrec.evaluation.ranking`.
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
from pmmrec.evaluation.ranking import evaluate_rankings
from pmmrec.models.pmmrec import PMMRec


@torch.no_grad()
def encode_catalogue(model: PMMRec, store: ItemFeatureStore | None, num_items: int, device: torch.device,
                     batch_size: int = 256, progress: bool = False) -> Tensor:
    """(N+1, D) vectors of items 0..N; row 0 (padding) is zero."""
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
        users = user_vectors(model, item_vecs, sequences.inputs, cfg.batch_size)
        targets, histories = sequences.targets.to(item_vecs.device), [h.to(item_vecs.device)
                                                                       for h in sequences.histories]
        if candidates is not None:
            candidates = candidates.to(item_vecs.device)
            local = torch.zeros(len(item_vecs), dtype=torch.long, device=item_vecs.device)  # merged -> local number
            local[candidates] = torch.arange(1, len(candidates) + 1, device=item_vecs.device)
            item_vecs = torch.cat([item_vecs[:1], item_vecs[candidates]])  # (C+1, D), row 0 = padding
            targets = local[targets]
            if bool((targets == 0).any()):
                raise ValueError("a target item lies outside the candidate catalogue")
            histories = [local[h][local[h] > 0] for h in histories]
        return evaluate_rankings(users, item_vecs, targets, histories, cfg.ks, user_chunk=cfg.batch_size,
                                 item_chunk=cfg.item_chunk)
    finally:
        model.train(was_training)


def mean_over_domains(per_domain: dict[str, dict]) -> dict:
    """Average each metric of each protocol over domains (every domain weighs the same)."""
    first = next(iter(per_domain.values()))
    return {protocol: {name: float(sum(d[protocol][name] for d in per_domain.values()) / len(per_domain))
                       for name in first[protocol]} for protocol in first}
