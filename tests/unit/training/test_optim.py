import pytest
import torch
from torch import nn

from pmmrec.config import TrainConfig
from pmmrec.training.optim import build_optimizer, build_scheduler, lr_factor


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.item_encoder = nn.Module()
        self.item_encoder.text = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.item_encoder.text_proj = nn.Linear(4, 2)
        self.user_encoder = nn.Linear(2, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_parameter_groups_split_encoder_and_decay():
    model = Toy()
    opt = build_optimizer(model, TrainConfig(lr=1e-3, encoder_lr=1e-5, weight_decay=0.1))
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"encoder", "encoder/no_decay", "rest", "rest/no_decay"}
    assert groups["encoder"]["lr"] == 1e-5 and groups["rest"]["lr"] == 1e-3
    assert groups["encoder"]["weight_decay"] == 0.1 and groups["rest/no_decay"]["weight_decay"] == 0.0
    # The text encoder's Linear weight decays; its bias and LayerNorm do not; projections belong to "rest".
    assert [p.shape for p in groups["encoder"]["params"]] == [torch.Size([4, 4])]
    assert len(groups["encoder/no_decay"]["params"]) == 3
    assert sum(len(g["params"]) for g in opt.param_groups) == 8  # frozen parameters are left out
    assert opt.defaults["fused"] is True  # CPU float32 parameters: the one-kernel AdamW


def test_fused_adamw_takes_the_same_step_as_the_default():
    torch.manual_seed(0)
    fused, plain = Toy(), Toy()
    plain.load_state_dict(fused.state_dict())
    cfg = TrainConfig(lr=1e-2, encoder_lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(fused, cfg)
    # The same groups over `plain`'s parameters, with the default (per-tensor, unfused) implementation.
    names = {id(q): n for n, q in fused.named_parameters()}
    plain_params = dict(plain.named_parameters())
    groups = [{"params": [plain_params[names[id(q)]] for q in g["params"]], "lr": g["lr"],
               "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    ref = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=False, foreach=False)
    assert not any(g["fused"] for g in ref.param_groups)
    for _ in range(3):
        x = torch.randn(5, 4)
        for model, o in ((fused, opt), (plain, ref)):
            o.zero_grad()
            model.user_encoder(model.item_encoder.text_proj(model.item_encoder.text(x))).pow(2).sum().backward()
            o.step()
    for (name, a), b in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_schedule_warms_up_then_decays_per_step():
    assert lr_factor(0, 4, 20, "cosine") == pytest.approx(0.25)
    assert lr_factor(3, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_factor(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(20, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_factor(12, 4, 20, "constant") == 1.0


def test_scheduler_is_stepped_per_optimizer_step():
    model = Toy()
    cfg = TrainConfig(lr=1.0, encoder_lr=1.0, warmup_steps=2, schedule="linear")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
