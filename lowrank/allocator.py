"""Keep freed memory in the process instead of handing it back to the OS (glibc's malloc).

glibc returns a freed block above its mmap threshold (128 KiB at start, raised dynamically) to the
kernel at once, and trims the top of the heap above its trim threshold. A CP sweep frees and
allocates the same megabyte-sized temporaries every few microseconds, so each sweep faults the
same pages in again: about a thousand minor page faults per sweep at 128 channels, and fits
1.2-1.3x slower than with the thresholds raised (``bench/allocator.py``). Raising them
(``mallopt``, the calls glibc documents for this) makes such blocks come back from the process's
own heap: blocks up to 256 MiB, and up to 256 MiB of free heap top kept before it is trimmed (the
cost: a process keeps up to that much of its peak after the peak). Where a glibc refuses an mmap
threshold above 32 MiB (``HEAP_MAX_SIZE / 2``, documented as the limit), 32 MiB is used.

``tune_allocator()`` applies it to the calling process (any time: it affects later allocations);
``WORKER_SETUP_HOOK`` names it for Ray's ``worker_process_setup_hook``, so every worker of a sweep
starts tuned. Elsewhere than glibc it does nothing and says so (returns False).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 256 << 20  # blocks above it are mmapped (and faulted in) afresh every time
MMAP_THRESHOLD_DOCUMENTED = 32 << 20  # HEAP_MAX_SIZE / 2 on 64-bit, where a glibc enforces it
TRIM_THRESHOLD = 256 << 20  # free heap kept at the top before it is handed back
WORKER_SETUP_HOOK = "lowrank.allocator.tune_allocator"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
OFF = {"default", "off", "0", "no", "false"}  # LOWRANK_MALLOC values that leave malloc as it is

_tuned = False


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds (bytes) for this process; True where it took effect.
    ``LOWRANK_MALLOC=default`` (or ``off``, ``0``, ``no``, ``false``) leaves the allocator as it is,
    to measure the difference. A later call with other thresholds applies them."""
    global _tuned
    if os.environ.get("LOWRANK_MALLOC", "").strip().lower() in OFF:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows)
        return False
    mmap = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) or mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_DOCUMENTED)
    _tuned = bool(mmap) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned


def allocator_tuned() -> bool:
    """Whether ``tune_allocator`` took effect in this process."""
    return _tuned


def allocator_note() -> str:
    """For a benchmark's header: how this process's malloc is set."""
    if _tuned:
        return "malloc tuned (lowrank.tune_allocator)"
    return "malloc as the platform sets it (LOWRANK_MALLOC=default, or not glibc)"
