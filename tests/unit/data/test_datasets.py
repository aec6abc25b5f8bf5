"""Training windows (train.windows: all / last / random) and evaluation sequences."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmmrec.data.datasets import EvalSequences, TrainWindows, tile_ends


def _targets(windows: TrainWindows) -> list[tuple[int, int]]:
    """(user, item) of every predicted position: a non-padded input followed by its target."""
    out = []
    for owner, window in zip(windows.owner.tolist(), windows.windows, strict=True):
        for j in range(len(window) - 1):
            if window[j] != 0:
                out.append((owner, int(window[j + 1])))
    return out


def test_all_tiles_each_sequence_from_its_end():
    train = [np.array([1, 2, 3, 4, 5]), np.array([6, 7])]
    w = TrainWindows(train, max_seq_len=2, mode="all")
    assert tile_ends(5, 2) == [5, 3] and tile_ends(2, 2) == [2] and tile_ends(1, 2) == []
    assert w.windows.tolist() == [[3, 4, 5], [1, 2, 3], [0, 6, 7]]
    assert w.owner.tolist() == [0, 0, 1]
    assert _targets(w) == [(0, 4), (0, 5), (0, 2), (0, 3), (1, 7)]  # 2..5 once each; 1 has no input


def test_last_is_one_window_per_user_as_the_reference():
    train = [np.array([1, 2, 3, 4, 5]), np.array([6, 7])]
    w = TrainWindows(train, max_seq_len=2, mode="last")
    assert w.windows.tolist() == [[3, 4, 5], [0, 6, 7]] and w.owner.tolist() == [0, 1]


def test_random_draws_one_window_per_user_per_epoch_reproducibly():
    train = [np.arange(1, 31), np.arange(31, 35), np.array([40])]
    a, b = TrainWindows(train, 3, "random", seed=7), TrainWindows(train, 3, "random", seed=7)
    seen = set()
    for epoch in range(20):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert len(a) == 3 and a.owner.tolist() == [0, 1, 2]
        assert np.array_equal(a.windows, b.windows)  # a function of (seed, epoch) alone: resume replays it
        window = a.windows[0]
        assert window[-1] >= 2 and np.all(np.diff(window[window > 0]) == 1)  # a contiguous slice ending anywhere
        seen.add(int(window[-1]))
    assert len(seen) > 5
    a.set_epoch(3)
    again = a.windows.copy()
    a.set_epoch(4)
    a.set_epoch(3)
    assert np.array_equal(a.windows, again)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match=r"train.windows must be one of \['all', 'last', 'random'\]"):
        TrainWindows([np.array([1, 2])], 2, "every")


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6), max_seq_len=st.integers(1, 9))
def test_all_makes_every_position_a_target_exactly_once(lengths, max_seq_len):
    offsets = np.cumsum([0, *lengths])
    train = [np.arange(offsets[u] + 1, offsets[u] + n + 1) for u, n in enumerate(lengths)]  # distinct items
    w = TrainWindows(train, max_seq_len, "all")
    got = sorted(_targets(w))
    want = sorted((u, int(i)) for u, seq in enumerate(train) for i in seq[1:])
    assert got == want
    assert w.windows.shape[1] == max_seq_len + 1


def test_eval_sequences_keep_the_whole_history():
    ev = EvalSequences.from_sequences([np.array([1, 2, 3, 4, 5])], max_seq_len=2)
    assert ev.inputs.tolist() == [[3, 4]] and ev.targets.tolist() == [5]
    assert ev.histories[0].tolist() == [1, 2, 3, 4]
