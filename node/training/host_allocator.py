"""Host memory for training on the CPU: freed activation buffers stay in the process for the next step.

glibc's malloc serves a block above its mmap threshold with a fresh mapping and returns it to the
kernel when freed, and trims the top of the heap once enough of it is free. The threshold moves with
what the process freed before (it rises to the largest mmapped block freed, up to 32 MiB), so how
often a training step's activations (a few MiB each) come back as new, zero-filled pages depended on
what ran before the loop: measured on bench/train.py's model, our loop, after tokenizing in 256 KiB
batches, took ~15,000 page faults per step (~60 MB of pages zeroed again, 3-4% of its CPU time) where
a loop that had tokenized the whole text at once took none. Fixing both settings makes every step
reuse the previous step's memory, whatever came before. The peak is what one step needs either way
(the freed memory is what the next step takes back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MAX_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling on 64-bit: larger blocks are always mapped
TRIM_THRESHOLD = 256 << 20  # free memory kept at the top of the heap before giving it back


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds for this process (once is enough); False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False  # not glibc (macOS, musl without mallopt): its allocator decides
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done: bool = mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the thresholds; training goes on with the allocator's defaults")
    return done
