"""The objective registry: an objective plugs in with one entry (term + heads), unknown names are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pmmrec.config import load_config
from pmmrec.errors import ConfigError
from pmmrec.models.pmmrec import PMMRec
from pmmrec.objectives import OBJECTIVES, Objective, in_use, register

TINY = Path(__file__).resolve().parents[3] / "configs" / "tiny.yaml"


def _toy_term(out, batch) -> torch.Tensor:
    """A toy objective: pull the last user state towards the toy head's output of the first item."""
    head = out.model.heads["toy"]
    return ((out.states[:, -1] - head(out.item_embs[:, 0])) ** 2).mean()


@pytest.fixture
def toy():
    objective = register(Objective("toy", _toy_term, heads=lambda config, encoder: {"toy": nn.Linear(
        config.model.dim, config.model.dim)}))  # the one registry line an extension needs
    yield objective
    del OBJECTIVES["toy"]


def test_a_toy_objective_added_in_one_line_trains_a_step(toy, tiny_domain, tmp_path):
    from pmmrec.training.api import build_trainer

    config = load_config(TINY, [f"data.domain={tiny_domain}", f"run.dir={tmp_path / 'run'}", "data.missing_image=blank",
                                "objectives.use=[rec, toy]", "objectives.weights={rec: 1.0, toy: 0.5}",
                                "train.batch_size=4"])
    trainer = build_trainer(config)
    assert set(trainer.model.heads) == {"toy"}
    head_before = trainer.model.heads["toy"].weight.detach().clone()
    batch = next(iter(trainer.batches.epoch(0)))
    loss, parts = trainer.train_step(batch)
    assert set(parts) == {"rec", "toy"} and parts["toy"] > 0
    assert loss == pytest.approx(parts["rec"] + 0.5 * parts["toy"], rel=1e-5)
    assert trainer.update == 1
    assert not torch.equal(trainer.model.heads["toy"].weight, head_before)  # its head trained


def test_objectives_run_in_registry_order_and_unknown_names_are_errors():
    config = load_config(None, ["objectives.use=[rcl, rec]"])
    assert [o.name for o in in_use(config.objectives)] == ["rec", "rcl"]
    with pytest.raises(ConfigError, match=r"objectives.use names unknown objective\(s\) \['ncil'\] \(did you mean "
                                          r"'nicl'\?\)"):
        in_use(load_config(None, ["objectives.use=[rec, ncil]"]).objectives)
    with pytest.raises(ConfigError, match="objectives.weights names unknown"):
        PMMRec(load_config(None, ["text.encoder=tiny", "vision.encoder=tiny", "model.dim=8",
                                  "objectives.weights={rec: 1.0, foo: 2.0}"]), num_items=3)


def test_register_refuses_a_taken_name_and_a_missing_config_section():
    with pytest.raises(ValueError, match="already registered"):
        register(Objective("rec", _toy_term))
    with pytest.raises(ValueError, match="objectives.nope"):
        register(Objective("nope", _toy_term, section="nope"))
    assert "nope" not in OBJECTIVES
