"""The bfloat16 shortlist: the same top-K as the float32 path, certified per user, with a float32 fallback."""

import pytest
import torch

from pmmrec.evaluation.ranking import topk_items
from pmmrec.inference.scoring import MARGIN, ShortlistScorer, block_topk


def catalogue(items=3000, dim=16, users=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(items + 1, dim, generator=gen)
    vectors[0] = 0
    return vectors, torch.randn(users, dim, generator=gen), gen


def histories(gen, users, items, longest=30):
    lengths = torch.randint(0, longest + 1, (users,), generator=gen)
    return [torch.randint(1, items + 1, (int(n),), generator=gen) for n in lengths]


@pytest.mark.parametrize("k", [1, 10, 50])
def test_shortlist_returns_the_float32_top_k(k):
    vectors, users, gen = catalogue()
    exclude = histories(gen, len(users), len(vectors) - 1)
    scorer = ShortlistScorer(vectors)
    for excl in (None, exclude):
        got_scores, got_items = scorer.topk(users, k, excl)
        want_scores, want_items = topk_items(users, vectors, k, excl)
        assert torch.equal(got_items, want_items)
        torch.testing.assert_close(got_scores, want_scores, rtol=1e-5, atol=1e-5)
    if exclude is not None:  # no excluded item is ever returned
        for row, excl in zip(got_items.tolist(), exclude, strict=True):
            assert not set(row) & set(excl.tolist())
    assert scorer.fallbacks == 0  # random vectors: the certificate holds for every user


def test_near_ties_fail_the_certificate_and_fall_back_to_float32():
    """Hundreds of items whose scores differ by less than bfloat16 can resolve: the shortlist cannot tell the
    best of them apart, so the certificate fails and those users get the float32 answer."""
    vectors, users, gen = catalogue(items=2000, users=6)
    direction = users[0] / users[0].norm()
    crowd = torch.arange(1, 400)
    vectors[crowd] = 3.0 * direction + 1e-4 * torch.randn(len(crowd), vectors.shape[1], generator=gen)
    scorer = ShortlistScorer(vectors)
    got = scorer.topk(users, 10)
    want = topk_items(users, vectors, 10)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)  # rescored: equal up to float32 rounding
    assert scorer.fallbacks >= 1


def test_the_error_bound_is_what_keeps_the_answer_exact(monkeypatch):
    """100 items and item 101 all score 2.0 in bfloat16; exactly, item 101 is best (2.0078 vs 2.0039). The
    shortlist may leave item 101 out: the bound on bfloat16 rounding then fails the certificate and the float32
    path answers. Without the bound the certificate would pass and a wrong item would be returned."""
    import pmmrec.inference.scoring as scoring

    vectors = torch.zeros(302, 2)
    vectors[1:101] = torch.tensor([1.0, 1.0039])
    vectors[101] = torch.tensor([1.0039, 1.0039])
    vectors[102:] = torch.rand(200, 2, generator=torch.Generator().manual_seed(0)) * 0.5
    users = torch.tensor([[1.0, 1.0]])
    assert topk_items(users, vectors, 1)[1].item() == 101
    assert ShortlistScorer(vectors).topk(users, 1)[1].item() == 101
    monkeypatch.setattr(scoring, "ERROR_FACTOR", 0.0)
    assert ShortlistScorer(vectors).topk(users, 1)[1].item() != 101


def test_small_catalogues_and_too_few_items_left():
    vectors, users, _ = catalogue(items=MARGIN + 5, users=3)
    scorer = ShortlistScorer(vectors)
    everything = [torch.arange(1, len(vectors))] * 3  # every item excluded: only padding slots are left
    got, want = scorer.topk(users, 5, everything), topk_items(users, vectors, 5, everything)
    assert torch.equal(got[1], want[1]) and bool((got[1] == 0).all())
    assert torch.equal(scorer.topk(users, 7)[1], topk_items(users, vectors, 7)[1])
    assert scorer.topk(users[:0], 3)[1].shape == (0, 3)


def test_a_nan_user_is_answered_by_the_float32_path():
    vectors, users, _ = catalogue(items=2000, users=4)
    users[2, 0] = float("nan")
    scorer = ShortlistScorer(vectors)
    got, want = scorer.topk(users, 5), topk_items(users, vectors, 5)
    assert torch.equal(got[1][[0, 1, 3]], want[1][[0, 1, 3]]) and scorer.fallbacks == 1


@pytest.mark.parametrize("width,m,group", [(1000, 5, 64), (4096, 42, 64), (4100, 42, 128), (300, 10, 64),
                                           (640, 10, 64)])
def test_block_topk_equals_topk(width, m, group):
    x = torch.randn(7, width, generator=torch.Generator().manual_seed(width))
    x[3, :] = 1.0  # a row of ties: values must still agree
    values, cols = block_topk(x, m, group)
    want = x.topk(m, dim=1)
    assert torch.equal(values, want.values) and torch.equal(x.gather(1, cols), values)
    assert all(len(set(row)) == m for row in cols.tolist())  # m distinct columns per row


def test_recommender_uses_the_shortlist_on_large_catalogues_with_the_same_answers():
    from pmmrec.bench.serve import synthetic_recommender
    from pmmrec.inference.recommender import SHORTLIST_MIN_ITEMS

    rec = synthetic_recommender(SHORTLIST_MIN_ITEMS + 500, dim=16)
    gen = torch.Generator().manual_seed(3)
    requests = [([f"i{int(n)}" for n in torch.randint(1, len(rec) + 1, (int(length),), generator=gen)], 10, True,
                 None) for length in torch.randint(1, 40, (30,), generator=gen)]
    rec.shortlist = True
    fast = rec.recommend_batch(requests)
    assert rec._scorer is not None and rec._scorer[1].fallbacks < len(requests)
    rec.shortlist = False
    exact = rec.recommend_batch(requests)
    assert [[r.item_id for r in a.items] for a in fast] == [[r.item_id for r in b.items] for b in exact]


def test_recommender_drops_a_shortlist_that_does_not_pay(monkeypatch):
    import pmmrec.inference.scoring as scoring
    from pmmrec.bench.serve import synthetic_recommender
    from pmmrec.inference.recommender import SHORTLIST_MIN_ITEMS

    monkeypatch.setattr(scoring, "ERROR_FACTOR", 1.0)  # a bound so wide that no certificate holds
    rec = synthetic_recommender(SHORTLIST_MIN_ITEMS + 10, dim=8)
    rec.shortlist = True
    requests = [([f"i{n}"], 5, True, None) for n in range(1, 301)]
    first = rec.recommend_batch(requests)  # answered (by the float32 fallback), and counted
    assert rec._scorer[1].fallbacks == 300 and rec.shortlist is True
    second = rec.recommend_batch(requests[:3])
    assert rec.shortlist is False and rec._scorer is None  # float32 from now on
    assert [r.item_id for r in first[0].items] == [r.item_id for r in second[0].items]


def test_a_scorer_whose_certificate_keeps_failing_stops_paying():
    vectors, users, gen = catalogue(items=3000, users=300)
    scorer = ShortlistScorer(vectors)
    scorer.topk(users, 10)
    assert scorer.users == 300 and scorer.pays
    scorer.fallbacks = 61  # over a fifth
    assert not scorer.pays
