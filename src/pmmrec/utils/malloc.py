"""glibc ``malloc`` settings that let PyTorch on CPU reuse freed memory instead of faulting it in again.

PyTorch has no caching allocator on CPU: every activation and gradient tensor is a ``malloc``/``free``. glibc
serves blocks of 32 MiB or more with a fresh ``mmap`` and gives them back with ``munmap`` when freed, and returns
the top of the heap to the system when over 128 KiB of it is free. A training step that allocates and frees a
few GiB of activations then pays, every step, for the kernel to zero and map every page again.

:func:`tune_malloc` raises the mmap threshold and the trim threshold to 256 MiB, so that freed blocks up to that
size stay in the process and are reused at once. Measured on the default multimodal training step (``pmmrec bench
train`` sizes, optimised path alone, 8 steps, 2 cores):

=====================  ===========  ==============  ============
thresholds             s/step       kernel (sys) s  peak RSS
=====================  ===========  ==============  ============
glibc defaults         2.72         11.9            3.9 GB
256 MiB (ours)         1.67         2.6             4.2 GB
512 MiB                1.63         0.5             4.6 GB
2 GiB                  1.51         0.2             5.6 GB
=====================  ===========  ==============  ============

Larger thresholds save a little more time for a lot more memory (freed blocks are kept, and the heap fragments),
so 256 MiB it is. The ``pmmrec`` command calls :func:`tune_malloc` at start. It does nothing when
``PMMREC_MALLOC_TUNING=0``, when the environment already sets glibc malloc options (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ...) or preloads another allocator (jemalloc and tcmalloc, which the PyTorch
performance guide suggests, do the same job), or off Linux/glibc.
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
THRESHOLD = 256 * 2**20  # bytes, for both thresholds (see the table above)
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
