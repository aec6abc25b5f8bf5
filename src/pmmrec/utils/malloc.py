"""glibc ``malloc`` settings that let PyTorch on CPU reuse freed memory instead of faulting it in again.

PyTorch has no caching allocator on CPU: every activation and gradient tensor is a ``malloc``/``free``. glibc
serves blocks of 32 MiB or more with a fresh ``mmap`` and gives them back with ``munmap`` when freed, and returns
the top of the heap to the system when over 128 KiB of it is free. A training step that allocates and frees a
few GiB of activations then pays, every step, for the kernel to zero and map every page again: measured on the
default multimodal training step (``pmmrec bench train`` sizes, 2 cores), 2.5 million page faults and 45% of
the step's time in the kernel, 2.45 s/step against 1.5 s/step with the settings below.

:func:`tune_malloc` raises the mmap threshold and the trim threshold to 2 GiB (the largest values ``mallopt``
takes), so freed blocks stay in the process and are reused at once. The cost is that memory freed after a peak is
kept rather than given back, which suits long training, evaluation and serving processes. This is the effect
the PyTorch performance guide gets by preloading jemalloc or tcmalloc, without a preload.

The ``pmmrec`` command calls it at start. It does nothing when ``PMMREC_MALLOC_TUNING=0``, when the
environment already sets glibc malloc options (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ...) or
preloads another allocator, or off Linux/glibc.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

ENV = "PMMREC_MALLOC_TUNING"
M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD = 2**31 - 1  # bytes: mallopt takes an int
_applied = False


def tune_malloc() -> bool:
    """Keep freed memory for reuse (see the module docstring). Returns whether the settings were applied."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False  # the user chose their own allocator settings
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = [libc.mallopt(ctypes.c_int(option), ctypes.c_int(THRESHOLD)) == 1
                for option in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD)]
    except (OSError, AttributeError) as e:
        log.debug("malloc tuning skipped: %s", e)
        return False
    global _applied
    _applied = _applied or all(done)
    return all(done)


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has applied its settings in this process (benchmarks record it)."""
    return _applied


def release_memory() -> None:
    """Collect garbage and give the heap's free memory back to the system (``malloc_trim``), e.g. between the
    phases of a benchmark, so that each phase's peak RSS is its own and not what a previous phase left free."""
    gc.collect()
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(ctypes.c_size_t(0))
        except (OSError, AttributeError) as e:
            log.debug("malloc_trim skipped: %s", e)
