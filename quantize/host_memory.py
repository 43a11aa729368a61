"""Host memory for CPU compute: keep freed heap pages in the process instead of returning them to the OS.

Why: a tuning step on the CPU allocates and frees the same activations and gradients every step, tens of
MB each. glibc's malloc gives such blocks back to the OS when they are freed (blocks above its mmap
threshold are unmapped; free space at the heap's top above its trim threshold is trimmed), so the next
step's tensors come from fresh pages that fault in, zeroed, on first touch: a 25 MB float32 tensor costs
~3.5 ms to allocate and fill against ~1.5 ms on reused pages. Fixing both thresholds (the mmap threshold at
glibc's ceiling, 32 MB on 64-bit, so such blocks come from the heap; trimming only above 2 GiB of free top)
made the reference model's tuning step 8-14% faster on a 2-core AMX Xeon, with the same results bit for
bit (benchmarks/NOTES.md v16). The cost is resident memory: the process keeps its high-water mark.

Process-wide and permanent (glibc has no way back to its dynamic thresholds), so it is set where a run
computes on the CPU, not on import.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

log = logging.getLogger("quantize")

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


@functools.cache
def keep_freed_pages() -> bool:
    """Set glibc's thresholds as above, once per process; False where the C library is not glibc (musl,
    macOS, Windows: nothing is changed) or glibc refused a value."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("host memory: freed heap pages %s", "kept (glibc thresholds fixed)" if done else "returned (glibc refused)")
    return done
