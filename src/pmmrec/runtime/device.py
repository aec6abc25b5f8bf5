"""This process's device and random seeds."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from pmmrec.runtime import distributed

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """This process's device for ``train.device`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``...); under torchrun it
    also joins the process group and takes the ``LOCAL_RANK``-th GPU."""
    return distributed.setup(name)


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` on ``device``: None on CPU or with ``off``; bf16 falls back to fp16
    (with a gradient scaler) on GPUs without bfloat16."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("train.amp=bf16 but this GPU has no bfloat16: using float16 with a gradient scaler")
        return torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
