"""The small modules that the auxiliary objectives need: shapes, the head-off ablation, gradients."""

from __future__ import annotations

import torch

from pmmrec.config import NiclConfig
from pmmrec.objectives import ContrastiveHead, NoiseClassifier


def test_contrastive_head_shapes_and_layers():
    head = ContrastiveHead(8)
    x = torch.randn(2, 5, 8)
    assert head(x).shape == (2, 5, 8)
    assert head(torch.randn(3, 8)).shape == (3, 8)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 8), (8, 8)]
    assert any(isinstance(m, torch.nn.GELU) for m in head.modules())


def test_contrastive_head_off_is_identity():
    head = ContrastiveHead.from_config(8, NiclConfig(head=False))
    x = torch.randn(2, 5, 8)
    assert torch.equal(head(x), x)
    assert list(head.parameters()) == []
    assert isinstance(ContrastiveHead.from_config(8, NiclConfig()).net, torch.nn.Sequential)


def test_noise_classifier_shapes_and_gradients():
    clf = NoiseClassifier(6)
    states = torch.randn(3, 4, 6, requires_grad=True)
    logits = clf(states)
    assert logits.shape == (3, 4)
    logits.sum().backward()
    assert states.grad is not None and clf.proj.weight.grad is not None


def test_heads_are_saved_in_state_dict():
    want = {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert set(ContrastiveHead(4).state_dict()) == want
    assert set(NoiseClassifier(4).state_dict()) == {"proj.weight", "proj.bias"}


def test_model_builds_one_head_per_auxiliary_objective_and_rcl_head_can_be_off():
    from pmmrec.config import load_config
    from pmmrec.models.pmmrec import PMMRec

    tiny = ["text.encoder=tiny", "vision.encoder=tiny", "model.dim=8"]
    model = PMMRec(load_config(None, [*tiny, "objectives.use=[rec, nicl, nid, rcl]"]), num_items=3)
    assert set(model.heads) == {"nicl_text", "nicl_image", "nid", "rcl"}
    assert isinstance(model.heads["rcl"].net, torch.nn.Sequential)
    off = PMMRec(load_config(None, [*tiny, "objectives.use=[rec, rcl]", "objectives.rcl.head=false"]), num_items=3)
    assert set(off.heads) == {"rcl"} and list(off.heads["rcl"].parameters()) == []
    assert set(PMMRec(load_config(None, tiny), num_items=3).heads) == set()  # rec alone needs no head
