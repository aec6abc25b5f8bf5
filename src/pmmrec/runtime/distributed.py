"""Data-parallel runs under ``torchrun`` (docs/design.md §6; docs/design.md, house rule 7: distributed means torchrun only).

``torchrun --nproc_per_node N [--nnodes M --rdzv-endpoint HOST:PORT] -m pmmrec train ...`` starts N processes per
node and tells each its place through the environment: ``LOCAL_RANK`` picks the device on its node (never the
global rank, which is how the reference code breaks on a second node), ``RANK`` and ``WORLD_SIZE`` decide which
users it trains and evaluates on. Without torchrun (or with a world of one) nothing here creates a process group
and every helper is the identity, so the same code runs in one plain process.

Everything is a thin function of ``torch.distributed``'s own state: no globals of ours.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor

from pmmrec.errors import PmmrecError

log = logging.getLogger(__name__)

__all__ = ["all_gather_objects", "all_gather_varlen", "all_reduce_sum", "barrier", "cleanup", "is_main",
           "launched_world_size", "main_first", "rank", "setup", "shard_sizes", "world_size"]


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise PmmrecError(f"WORLD_SIZE={value!r} is not a number (set by torchrun)") from None


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise PmmrecError(f"WORLD_SIZE is set but {name} is not: launch with torchrun, which sets both")
    try:
        return int(value)
    except ValueError:
        raise PmmrecError(f"{name}={value!r} is not a number (set by torchrun)") from None


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that writes run files, logs and checkpoints."""
    return rank() == 0


def setup(device_name: str) -> torch.device:
    """The device of this process, joining torchrun's process group first when there is one.

    ``device_name`` is ``train.device``: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:K``.
    Under torchrun a GPU process takes ``cuda:LOCAL_RANK`` (an explicit index would put every process on one
    GPU, so it is refused) and talks through NCCL; CPU processes talk through gloo. Calling it again in the same
    process (several trainers in one run) reuses the group.
    """
    world = launched_world_size()
    if world <= 1:
        return _single_device(device_name)
    local_rank = _env_int("LOCAL_RANK")
    if device_name == "auto":
        use_cuda = torch.cuda.is_available()
    elif device_name == "cpu":
        use_cuda = False
    elif device_name == "cuda":
        use_cuda = True
        if not torch.cuda.is_available():
            raise PmmrecError("train.device=cuda but no CUDA device is available")
    elif device_name.startswith("cuda:"):
        raise PmmrecError(f"train.device={device_name} names one GPU, but torchrun started {world} processes: use "
                          "train.device=cuda (each process takes cuda:LOCAL_RANK; choose GPUs with "
                          "CUDA_VISIBLE_DEVICES)")
    else:
        raise PmmrecError(f"train.device={device_name} cannot be shared by torchrun's processes: use auto, cpu "
                          "or cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise PmmrecError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                              "start at most that many processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if is_initialized():
        if dist.get_backend() != backend:
            raise PmmrecError(f"this process already joined a {dist.get_backend()} group; train.device="
                              f"{device_name} needs {backend}")
        return device
    dist.init_process_group(backend, timeout=timedelta(minutes=30),
                            device_id=device if use_cuda else None)
    if dist.get_world_size() != world:  # cannot happen with torchrun; guards a hand-made environment
        raise PmmrecError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} processes")
    if not is_main():
        # One process speaks for the run: the others log warnings and errors only.
        logging.getLogger("pmmrec").setLevel(logging.WARNING)
    log.info("distributed: %d processes (%s), rank 0 on %s", world, backend, device)
    return device


def _single_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PmmrecError(f"train.device={name} but no CUDA device is available")
    return device


def cleanup() -> None:
    """Leave the process group (a no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache on disk); the others wait, then run it (and read it).

    When rank 0 fails inside the block it never reaches the barrier: torchrun then stops the waiting ranks.
    """
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over ranks of ``tensor`` (a new tensor; no gradient)."""
    out = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(out)
    return out


def shard_sizes(total: int, world: int) -> list[int]:
    """Sizes of ``world`` contiguous slices of ``total`` things, as equal as possible, larger ones first."""
    base, extra = divmod(total, world)
    return [base + (r < extra) for r in range(world)]


def all_gather_varlen(tensor: Tensor, grad: bool = False) -> list[Tensor]:
    """Every rank's ``tensor`` (their first dimensions may differ), in rank order; this rank's is the input.

    ``grad=True`` keeps the autograd graph across ranks (``torch.distributed.nn.functional.all_gather``): the
    gradient that any rank's loss sends to a gathered slice flows back to the rank that owns it, summed over
    ranks. Collectives need equal shapes, so slices are zero-padded to the longest and cut back after.
    """
    world = world_size()
    if world == 1:
        return [tensor]
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    lengths = [int(s) for s in sizes]
    longest = max(lengths)
    pad = [0, 0] * (tensor.dim() - 1) + [0, longest - tensor.shape[0]]
    padded = F.pad(tensor, pad) if longest > tensor.shape[0] else tensor.contiguous()
    if grad:
        with warnings.catch_warnings():
            # torch marks this autograd-aware gather deprecated in favour of a private module; it is the public one.
            warnings.simplefilter("ignore", FutureWarning)
            parts = list(dist_fn.all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    return [part[:n] for part, n in zip(parts, lengths, strict=True)]


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (small things: RNG states)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
