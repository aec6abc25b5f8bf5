"""Choosing the resume point among last.pt, last.prev.pt and best.pt when some are missing or corrupted."""

import logging

import pytest
import torch

from pmmrec.errors import PmmrecError
from pmmrec.runtime.checkpoint import load_checkpoint, load_resume_checkpoint, previous_path, save_checkpoint


def _state(update):
    return {"trainer_state": {"update": update}, "model": {"w": torch.full((4,), float(update))}}


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_keep_previous_rotates_the_replaced_file(tmp_path):
    last = tmp_path / "last.pt"
    assert previous_path(last) == tmp_path / "last.prev.pt"
    save_checkpoint(last, _state(1), keep_previous=True)
    assert not previous_path(last).exists()  # nothing to keep yet
    save_checkpoint(last, _state(2), keep_previous=True)
    save_checkpoint(last, _state(3), keep_previous=True)
    assert load_checkpoint(last)["trainer_state"]["update"] == 3
    assert load_checkpoint(previous_path(last))["trainer_state"]["update"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]  # no temporaries left


def test_the_latest_good_checkpoint_wins_and_bad_ones_are_named(tmp_path, caplog):
    last, prev, best = tmp_path / "last.pt", tmp_path / "last.prev.pt", tmp_path / "best.pt"
    assert load_resume_checkpoint([last, prev, best]) is None  # a fresh run
    save_checkpoint(best, _state(4))
    save_checkpoint(last, _state(4))
    save_checkpoint(last, _state(6), keep_previous=True)
    assert load_resume_checkpoint([last, prev, best])[0] == last
    _flip(last)
    with caplog.at_level(logging.WARNING):
        path, state = load_resume_checkpoint([last, prev, best])
    assert path == prev and state["trainer_state"]["update"] == 4  # a tie with best.pt goes to the earlier name
    assert f"{last}: checksum mismatch" in caplog.text and "resuming from" in caplog.text
    last.write_bytes(last.read_bytes()[:100])
    _flip(prev)
    assert load_resume_checkpoint([last, prev, best])[0] == best
    # best.pt newer than last.pt (killed between the two writes of one evaluation) is the later state.
    save_checkpoint(best, _state(9))
    assert load_resume_checkpoint([last, prev, best])[1]["trainer_state"]["update"] == 9


def test_nothing_usable_is_one_error_listing_each_file(tmp_path):
    paths = [tmp_path / "last.pt", tmp_path / "last.prev.pt", tmp_path / "best.pt"]
    for p in paths:
        save_checkpoint(p, _state(1))
        _flip(p)
    save_checkpoint(tmp_path / "old.pt", {"model": {}})  # loadable but not a training state
    with pytest.raises(PmmrecError) as e:
        load_resume_checkpoint([*paths, tmp_path / "old.pt"])
    message = str(e.value)
    assert "\n" not in message and message.startswith("no usable checkpoint to resume from")
    assert message.count("checksum mismatch") == 3 and "old.pt: no trainer_state.update" in message
