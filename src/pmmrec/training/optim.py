"""AdamW with parameter groups and per-step learning-rate schedules (PMMRec ref code: AdamW, 1e-4 for both the
encoder blocks and the rest, weight decay on weights only).

Groups: trainable encoder blocks (``train.encoder_lr``) and everything else (``train.lr``), each split into decayed
weights (2-D and up) and undecayed biases / norm scales / embeddings of padding. The schedule is stepped once per
optimiser step, never per epoch (the reference code steps per epoch, so its LR never decays).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from pmmrec.config import TrainConfig

log = logging.getLogger(__name__)

ENCODER_PREFIXES = ("item_encoder.text.", "item_encoder.vision.")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "norm" in name.lower() or ".bn" in name or "_bn" in name


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (name.startswith(ENCODER_PREFIXES), _no_decay(name, param))
        groups.setdefault(key, []).append(param)
    param_groups = []
    for (encoder, no_decay), params in sorted(groups.items()):
        param_groups.append({"params": params, "lr": cfg.encoder_lr if encoder else cfg.lr,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                             "name": f"{'encoder' if encoder else 'rest'}{'/no_decay' if no_decay else ''}"})
        log.info("optimiser group %s: %d tensors, %d parameters", param_groups[-1]["name"], len(params),
                 sum(p.numel() for p in params))
    # fused: one kernel over all tensors instead of a dozen small ops per tensor (on CPU, 27 ms -> 8 ms a step
    # for 12.5M parameters). Where a parameter's device or dtype has no fused kernel, the default one is used.
    try:
        return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), fused=True)
    except RuntimeError as e:
        log.debug("fused AdamW unavailable (%s); using the default implementation", e)
        return torch.optim.AdamW(param_groups, betas=(0.9, 0.999))


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the base LR after ``step`` optimiser steps: linear warm-up, then the schedule."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.schedule))
