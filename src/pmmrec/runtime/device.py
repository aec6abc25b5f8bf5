"""This process's device and random seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

from pmmrec.runtime import distributed


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
