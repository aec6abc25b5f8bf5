"""Non-learned reference points, evaluated with the same full ranking as the models."""

from __future__ import annotations

import numpy as np
import torch

from pmmrec.data.datasets import EvalSequences
from pmmrec.evaluation.ranking import evaluate_rankings


def most_popular(train_counts: np.ndarray, sequences: EvalSequences, ks: list[int]) -> dict:
    """Rank every item by its training frequency (the same list for every user), both protocols."""
    item_vecs = torch.as_tensor(np.asarray(train_counts, dtype=np.float64), dtype=torch.float64)[:, None]
    item_vecs[0] = 0.0  # (N+1, 1): a score per item; row 0 is padding
    users = torch.ones(len(sequences), 1, dtype=torch.float64)  # (U, 1)
    return evaluate_rankings(users, item_vecs, sequences.targets, sequences.histories, ks)
