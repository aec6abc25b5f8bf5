import pickle
import random

import numpy as np
import pytest
import torch

from pmmrec.errors import PmmrecError
from pmmrec.runtime.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def test_round_trip_restores_rng_streams(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state(), "model": {"w": torch.ones(2)}})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = load_checkpoint(tmp_path / "c.pt")
    set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert torch.equal(state["model"]["w"], torch.ones(2)) and state["format_version"] == 1


def test_plain_torch_files_still_load(tmp_path):
    torch.save({"format_version": 1, "model": {"w": torch.zeros(1)}}, tmp_path / "plain.pt")
    assert torch.equal(load_checkpoint(tmp_path / "plain.pt")["model"]["w"], torch.zeros(1))


def test_corruption_is_detected(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.arange(1000.0)}})
    data = bytearray((tmp_path / "c.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "c.pt").write_bytes(bytes(data))
    with pytest.raises(PmmrecError, match="checksum mismatch"):
        load_checkpoint(tmp_path / "c.pt")
    (tmp_path / "c.pt").write_bytes(bytes(data[: len(data) // 3]))  # truncated
    with pytest.raises(PmmrecError, match="not a loadable pmmrec checkpoint"):
        load_checkpoint(tmp_path / "c.pt")
    (tmp_path / "c.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PmmrecError, match="not a loadable pmmrec checkpoint"):
        load_checkpoint(tmp_path / "c.pt")
    with pytest.raises(PmmrecError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


class Evil:
    def __reduce__(self):
        return (exec, ("import os; os.environ['PMMREC_PWNED'] = '1'",))


def test_a_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": Evil()}, path, pickle_module=pickle)
    with pytest.raises(PmmrecError, match="not a loadable"):
        load_checkpoint(path)
    import os

    assert "PMMREC_PWNED" not in os.environ
