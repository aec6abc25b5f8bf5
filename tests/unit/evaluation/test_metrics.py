"""HR/NDCG/MRR@K from ranks, checked against numbers computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmmrec.evaluation import mean_metrics, metric_sums, metrics_from_ranks, per_user_metrics


def test_hand_computed_metrics():
    ranks = torch.tensor([0, 1, 2, -1, 9, 10])  # 0-based; -1 = not retrieved
    got = metrics_from_ranks(ranks, [1, 10])
    assert list(got) == ["HR@1", "HR@10", "NDCG@1", "NDCG@10", "MRR@1", "MRR@10"]
    assert got["HR@1"] == pytest.approx(1 / 6)
    assert got["HR@10"] == pytest.approx(4 / 6)  # ranks 0, 1, 2, 9; rank 10 is the 11th item
    # RecBole-style: the item at 0-based rank 2 is at position 3, so its gain is 1 / log2(3 + 1).
    assert got["NDCG@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(4) + 1 / np.log2(11)) / 6)
    assert got["NDCG@1"] == pytest.approx(1 / 6)
    assert got["MRR@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 10) / 6)
    assert got["MRR@1"] == pytest.approx(1 / 6)


def test_single_user_values():
    assert metrics_from_ranks([2], [3]) == pytest.approx({"HR@3": 1.0, "NDCG@3": 0.5, "MRR@3": 1 / 3})
    assert metrics_from_ranks([3], [3]) == {"HR@3": 0.0, "NDCG@3": 0.0, "MRR@3": 0.0}
    assert metrics_from_ranks([None], [3]) == {"HR@3": 0.0, "NDCG@3": 0.0, "MRR@3": 0.0}


def test_sums_add_up_across_shards():
    gen = torch.Generator().manual_seed(0)
    ranks = torch.randint(-1, 30, (101,), generator=gen)
    ks = [5, 10, 20]
    shards = [metric_sums(part, ks) for part in ranks.split(17)]
    total = {key: sum(s[key] for s in shards) for key in shards[0]}
    assert total["count"] == 101
    assert mean_metrics(total) == pytest.approx(metrics_from_ranks(ranks, ks))


def test_per_user_metrics():
    got = per_user_metrics(torch.tensor([0, 4, -1]), 5)
    torch.testing.assert_close(got["HR@5"], torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(got["NDCG@5"], torch.tensor([1.0, 1 / np.log2(6), 0.0], dtype=torch.float64))
    torch.testing.assert_close(got["MRR@5"], torch.tensor([1.0, 0.2, 0.0], dtype=torch.float64))


def test_no_user_gives_zeros_not_nan():
    assert metrics_from_ranks(torch.zeros(0, dtype=torch.long), [10]) == {"HR@10": 0.0, "NDCG@10": 0.0,
                                                                          "MRR@10": 0.0}


def test_bad_arguments():
    with pytest.raises(ValueError, match="ks"):
        metrics_from_ranks([0], [0])
    with pytest.raises(ValueError, match="ks"):
        metrics_from_ranks([0], [])
    with pytest.raises(ValueError, match="1-D"):
        metrics_from_ranks(torch.zeros(2, 2, dtype=torch.long), [1])
    with pytest.raises(ValueError, match="integers"):
        metrics_from_ranks(torch.zeros(2), [1])
