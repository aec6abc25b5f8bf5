import numpy as np
import pytest
import torch

from pmmrec.data.datasets import EvalSequences
from pmmrec.evaluation.baselines import most_popular


def test_most_popular_ranks_by_training_frequency():
    counts = np.array([0, 10, 5, 1, 7])  # item 1 most popular, then 4, 2, 3
    seqs = EvalSequences(inputs=torch.zeros(3, 2, dtype=torch.long), targets=torch.tensor([1, 2, 3]),
                         histories=[torch.tensor([4]), torch.tensor([1]), torch.tensor([], dtype=torch.long)])
    out = most_popular(counts, seqs, ks=[1, 3])
    # include_history ranks: target 1 -> 0, target 2 -> 2, target 3 -> 3.
    inc = out["include_history"]
    assert inc["HR@1"] == pytest.approx(1 / 3) and inc["HR@3"] == pytest.approx(2 / 3)
    # exclude_history: user 2's history holds item 1, so item 2 moves up to rank 1.
    exc = out["exclude_history"]
    assert exc["HR@3"] == pytest.approx(2 / 3)
    assert exc["NDCG@3"] == pytest.approx((1 + 1 / np.log2(3)) / 3)
