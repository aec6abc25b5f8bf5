"""Chunked full ranking against a dense score matrix + argsort, under both protocols and both tie rules."""

from __future__ import annotations

import itertools

import pytest
import torch

from pmmrec.evaluation import (
    evaluate_rankings,
    full_rank,
    metrics_from_ranks,
    pad_histories,
    rank_targets,
    topk_items,
)


def dense_ranks(user_vecs, item_vecs, targets, histories, exclude_history, ties, target_in_history="keep"):
    """Score every item, drop padding (and history), stable-sort descending, read off the target's position."""
    scores = user_vecs @ item_vecs.t()  # (U, N+1)
    ranks = []
    for u, target in enumerate(targets.tolist()):
        history = {int(i) for i in histories[u] if int(i) != 0}
        if exclude_history and target_in_history == "miss" and target in history:
            ranks.append(-1)
            continue
        others = [i for i in range(1, item_vecs.shape[0]) if i != target]
        if exclude_history:
            others = [i for i in others if i not in history]
        # A stable sort keeps equal scores in list order: the target placed last loses every tie (pessimistic),
        # placed first wins them (optimistic).
        order = others + [target] if ties == "pessimistic" else [target] + others
        sorted_pos = torch.argsort(scores[u, order], descending=True, stable=True)
        ranks.append(int((sorted_pos == order.index(target)).nonzero()))
    return torch.tensor(ranks)


def random_case(seed, users=13, items=37, dim=4, integer=False):
    gen = torch.Generator().manual_seed(seed)
    if integer:  # small integers: exact float32 dot products and many exact ties
        user_vecs = torch.randint(-2, 3, (users, dim), generator=gen).float()
        item_vecs = torch.randint(-2, 3, (items + 1, dim), generator=gen).float()
    else:
        user_vecs = torch.randn(users, dim, generator=gen, dtype=torch.float64)
        item_vecs = torch.randn(items + 1, dim, generator=gen, dtype=torch.float64)
    targets = torch.randint(1, items + 1, (users,), generator=gen)
    histories = []
    for u in range(users):
        hist = torch.randint(1, items + 1, (int(torch.randint(0, 9, (1,), generator=gen)),), generator=gen)
        if u % 3 == 0:  # the target was consumed before
            hist = torch.cat([hist, targets[u : u + 1]])
        histories.append(hist)
    return user_vecs, item_vecs, targets, histories


CHUNKS = [(1, 1), (1, 5), (3, 7), (13, 36), (4, 37), (256, 65536)]


@pytest.mark.parametrize("user_chunk,item_chunk", CHUNKS)
@pytest.mark.parametrize("integer", [False, True])
def test_ranks_match_dense_reference(user_chunk, item_chunk, integer):
    for seed in range(2):
        user_vecs, item_vecs, targets, histories = random_case(seed, integer=integer)
        for exclude, ties in itertools.product([True, False], ["pessimistic", "optimistic"]):
            got = full_rank(user_vecs, item_vecs, targets, histories, exclude_history=exclude, ties=ties,
                            user_chunk=user_chunk, item_chunk=item_chunk)
            want = dense_ranks(user_vecs, item_vecs, targets, histories, exclude, ties)
            assert torch.equal(got, want), (seed, exclude, ties)


def test_one_pass_gives_both_protocols_and_miss_mode():
    user_vecs, item_vecs, targets, histories = random_case(5, integer=True)
    both = rank_targets(user_vecs, item_vecs, targets, histories, target_in_history="miss", item_chunk=10)
    assert set(both) == {"exclude_history", "include_history"}
    assert torch.equal(both["exclude_history"],
                       dense_ranks(user_vecs, item_vecs, targets, histories, True, "pessimistic", "miss"))
    assert torch.equal(both["include_history"],
                       dense_ranks(user_vecs, item_vecs, targets, histories, False, "pessimistic"))
    assert (both["exclude_history"][::3] == -1).all()  # every third user has its target in its history


def test_target_in_history_hand_example():
    # Items 1..4 score 4, 3, 2, 1 for the single user; the target is item 3 and the history is {1, 3}.
    user_vecs = torch.tensor([[1.0]])
    item_vecs = torch.tensor([[0.0], [4.0], [3.0], [2.0], [1.0]])
    targets, histories = torch.tensor([3]), [torch.tensor([1, 3])]
    assert full_rank(user_vecs, item_vecs, targets, histories, exclude_history=False).tolist() == [2]
    # Item 1 is removed, the target stays: only item 2 is above it.
    assert full_rank(user_vecs, item_vecs, targets, histories).tolist() == [1]
    # The reference code masks the target together with the history: a miss.
    assert full_rank(user_vecs, item_vecs, targets, histories, target_in_history="miss").tolist() == [-1]


def test_ties_hand_example():
    # Items 1, 2, 3 score 1, 2, 2 and the target is item 3: one tie (item 2), nothing strictly above.
    user_vecs = torch.tensor([[1.0]])
    item_vecs = torch.tensor([[5.0], [1.0], [2.0], [2.0]])  # the padding row's high score never counts
    targets = torch.tensor([3])
    assert full_rank(user_vecs, item_vecs, targets, exclude_history=False).tolist() == [1]
    assert full_rank(user_vecs, item_vecs, targets, exclude_history=False, ties="optimistic").tolist() == [0]
    # A collapsed model (every score equal) is last under the default rule, not first.
    flat = torch.zeros(11, 3)
    assert full_rank(torch.ones(2, 3), flat, torch.tensor([1, 7]), exclude_history=False).tolist() == [9, 9]


def test_nan_target_score_is_a_miss():
    user_vecs = torch.tensor([[float("nan"), 0.0], [1.0, 0.0]])
    item_vecs = torch.randn(6, 2)
    ranks = full_rank(user_vecs, item_vecs, torch.tensor([1, 2]), exclude_history=False)
    assert ranks[0].item() == -1 and ranks[1].item() >= 0


def test_evaluate_rankings():
    user_vecs, item_vecs, targets, histories = random_case(2)
    got = evaluate_rankings(user_vecs, item_vecs, targets, histories, ks=[5, 10], item_chunk=8, user_chunk=5)
    assert list(got) == ["exclude_history", "include_history"]
    for protocol, exclude in [("exclude_history", True), ("include_history", False)]:
        ranks = dense_ranks(user_vecs, item_vecs, targets, histories, exclude, "pessimistic")
        assert got[protocol] == pytest.approx(metrics_from_ranks(ranks, [5, 10]))
    assert got["exclude_history"]["HR@10"] >= got["include_history"]["HR@10"]


def test_padded_tensor_histories_equal_lists():
    user_vecs, item_vecs, targets, histories = random_case(3)
    padded = pad_histories(histories)
    assert padded.shape == (13, max(len(h) for h in histories))
    assert torch.equal(full_rank(user_vecs, item_vecs, targets, padded, item_chunk=6),
                       full_rank(user_vecs, item_vecs, targets, histories))
    assert pad_histories([[], []]).shape == (2, 0)


def test_bad_arguments():
    user_vecs, item_vecs, targets, histories = random_case(0)
    with pytest.raises(ValueError, match="targets"):
        full_rank(user_vecs, item_vecs, torch.zeros(13, dtype=torch.long), histories)
    with pytest.raises(ValueError, match="histories"):
        full_rank(user_vecs, item_vecs, targets, None)
    with pytest.raises(ValueError, match="histories"):
        full_rank(user_vecs, item_vecs, targets, [torch.tensor([99])] * 13)
    with pytest.raises(ValueError, match="protocols"):
        rank_targets(user_vecs, item_vecs, targets, histories, protocols=["bogus"])
    with pytest.raises(ValueError, match="chunk"):
        full_rank(user_vecs, item_vecs, targets, histories, item_chunk=0)


def dense_topk(user_vecs, item_vecs, k, exclude):
    scores = user_vecs @ item_vecs.t()  # (U, N+1)
    scores[:, 0] = float("-inf")
    if exclude is not None:
        for u, hist in enumerate(exclude):
            scores[u, hist] = float("-inf")
    return torch.topk(scores, k, dim=1)


@pytest.mark.parametrize("user_chunk,item_chunk", CHUNKS)
@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_matches_dense_topk(user_chunk, item_chunk, k):
    user_vecs, item_vecs, _, histories = random_case(7)
    for exclude in (None, histories):
        scores, items = topk_items(user_vecs, item_vecs, k, exclude, user_chunk=user_chunk, item_chunk=item_chunk)
        want = dense_topk(user_vecs, item_vecs, k, exclude)
        torch.testing.assert_close(scores, want.values)
        assert torch.equal(items, want.indices)
        if exclude is not None:
            for row, hist in zip(items.tolist(), histories, strict=True):
                assert not set(row) & set(hist.tolist())


def test_topk_with_fewer_items_than_k():
    item_vecs = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    scores, items = topk_items(torch.tensor([[1.0]]), item_vecs, 6, [torch.tensor([2, 4])], item_chunk=3)
    assert items.tolist() == [[3, 1, 0, 0, 0, 0]]
    assert scores[0, :2].tolist() == [3.0, 1.0]
    assert torch.isinf(scores[0, 2:]).all()


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_rank_counting_over_wide_ragged_chunks(ties):
    """Chunks wider than one 1024-column counting block, a narrower last chunk, and ranks far above 255 (the
    word-packed count of `_BeatsBuffer` must neither carry between bytes nor keep the wider chunk's tail)."""
    gen = torch.Generator().manual_seed(7)
    num_items, num_users = 5000, 9
    user_vecs = torch.randint(-2, 3, (num_users, 3), generator=gen).float()  # exact ties, ranks in the thousands
    item_vecs = torch.randint(-2, 3, (num_items + 1, 3), generator=gen).float()
    targets = torch.randint(1, num_items + 1, (num_users,), generator=gen)
    histories = torch.randint(0, num_items + 1, (num_users, 30), generator=gen)
    for user_chunk, item_chunk in [(4, 2100), (9, 1024), (2, 4999)]:
        got = rank_targets(user_vecs, item_vecs, targets, histories, ties=ties, user_chunk=user_chunk,
                           item_chunk=item_chunk)
        for protocol, exclude in [("exclude_history", True), ("include_history", False)]:
            want = dense_ranks(user_vecs, item_vecs, targets, histories, exclude, ties)
            assert torch.equal(got[protocol], want), (protocol, user_chunk, item_chunk)
    assert int(got["include_history"].max()) > 1000


def test_item_blocks_read_like_one_padded_matrix():
    from pmmrec.evaluation.ranking import ItemBlocks

    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(11, 4, generator=gen)
    dense[0] = 0
    blocks = ItemBlocks([dense[1:4], dense[4:5], dense[5:11]])
    assert blocks.count == 10 and blocks.num_rows == 11 and blocks.starts == [1, 4, 5]
    torch.testing.assert_close(blocks.dense(), dense, rtol=0, atol=0)
    numbers = torch.tensor([[0, 1, 3, 4], [5, 10, 0, 2]])
    torch.testing.assert_close(blocks.gather(numbers), dense[numbers], rtol=0, atol=0)
    torch.testing.assert_close(blocks.rows(3, 7), dense[3:7], rtol=0, atol=0)
    assert [(first, len(chunk)) for first, chunk in blocks.chunks(4)] == [(1, 3), (4, 1), (5, 4), (9, 2)]
    users = torch.randn(3, 4, generator=gen)
    exclude = [[2, 5], [], [10]]
    for k in (1, 4, 10):
        want = topk_items(users, dense, k, exclude, item_chunk=3)
        got = topk_items(users, blocks, k, exclude, item_chunk=3)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
