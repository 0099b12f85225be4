"""How a trial's process treats freed memory: glibc's malloc keeps it for the next step.

By default glibc trims the top of its heap once more than a threshold lies free there, and
serves blocks above another threshold with fresh ``mmap`` s that ``free`` unmaps. A CPU
training step frees most of its activations at the end of the backward pass, so every
step faulted them all in again: about 10,000 page faults per ResNet-20 step (batch 128),
2-10% of the step's time on this project's 2-core VM, for both batch norm and RobustNorm
(``benchmarks/bench_step.py --malloc both``). With no trimming and no ``mmap`` below
32 MiB (glibc's maximum), the heap stays at its peak size, which every step reaches
anyway, and later steps reuse it. PyTorch's CPU tuning guide gives the same advice by
swapping the allocator for jemalloc or tcmalloc; this needs no extra library.

``run_trial`` calls ``keep_freed_memory`` as it starts, so ``normlab trial`` and every
Ray worker running trials get it; ``NORMLAB_KEEP_FREED_MEMORY=0`` leaves glibc's defaults.
It is process-wide and a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import os

ENV = "NORMLAB_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses larger on 64-bit


def wanted() -> bool:
    """Whether the environment asks for it (anything but ``0``, ``false``, ``no``, ``off``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def keep_freed_memory(force: bool = False) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel,
    unless ``NORMLAB_KEEP_FREED_MEMORY=0`` (``force``: regardless). Whether it is now so:
    False where the C library is not glibc, or it was not wanted."""
    if not (force or wanted()):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))
