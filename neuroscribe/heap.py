"""glibc heap settings for the passes of every stage: memory freed by one batch is reused by the next.

A CPU forward pass of a CNN at 224 px on a batch of 32 allocates and frees tensors of tens to hundreds of MiB. glibc
serves every block above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and unmaps it on ``free``,
so each batch page-faults all of them in again (the kernel zeroes every fresh page): about 20,000 minor faults per
image for EfficientNet-Lite0; a folded EfficientNet-Lite0 forward, batch 32 at 224 px on 2 cores, takes 2.0-2.3 s with
~290,000 faults a batch, and 1.0 s with none inside :func:`reuse_freed_memory`. Record's pass over the probe and the
entries of describe, flag, ablate, evaluate and train run inside it, hence a core module. Inside
:func:`reuse_freed_memory` glibc keeps large blocks on its heap (``M_MMAP_MAX = 0``) and does not trim the heap's free
top (``M_TRIM_THRESHOLD`` = 2 GiB - 1), so every batch after the first reuses the pages of the one before: the faults
no longer scale with the number of images. The price is the heap's fragmentation: the same tensors are alive at the
peak, but a block freed in the middle of the heap only serves a request that fits it (a padded copy a little larger
than the map it pads does not), so the heap grows past what is alive, and between batches the process keeps its peak
resident. Measured (``benchmarks/record_overhead.py --memory-repeats 3``, 2026-12-06, Intel Xeon, 2 threads;
EfficientNet-Lite0 folded, 18 layers, batch 32 at 224 px): the record stage peaks at 1,438-1,661 MiB RSS inside these
settings (six runs of 1,000 and 4,000 photos), its module's bare forward alone at 1,356-1,647 MiB, and the record
stage at 1,222-1,240 MiB with every block of 128 KiB or more mmapped (``MALLOC_MMAP_MAX_`` set; ~640 MiB of malloc'd
blocks alive at the peak either way), with 400 / 100 minor faults per image at 1,000 / 4,000 photos (a fixed ~0.4 M in
all) instead of 16,500-16,900 and half the CPU time in the kernel (glibc left entirely alone -- a ``glibc.malloc``
tunable set, its dynamic threshold on: 1,286-1,362 MiB, ~10,000 faults a photo, 0.78-0.82 s a batch against 0.52-0.56
inside these settings). The spread comes from the order in which blocks are freed (DataLoader timing, address
randomisation), not from what is kept. On leaving, large blocks are mmapped again (``M_MMAP_MAX`` back to glibc's
default 65,536), the trim threshold is set to 64 MiB (twice the largest mmap threshold glibc's dynamic rule would
reach, 32 MiB) and ``malloc_trim(0)`` returns the free pages to the kernel.

Nothing is changed when the C library is not glibc or when the environment sets glibc's malloc tunables itself
(``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_`` or a
``glibc.malloc`` entry in ``GLIBC_TUNABLES``): an explicit choice wins (``MALLOC_MMAP_MAX_=65536`` turns the reuse off
for a run, and with it glibc's dynamic mmap threshold: every block of 128 KiB or more is then mmapped, the least peak
memory and the most page faults; ``GLIBC_TUNABLES=glibc.malloc.perturb=0`` leaves glibc entirely as it is). Any
``mallopt`` of these parameters, here too, turns glibc's dynamic mmap threshold off for the rest of the process: after
the block, the threshold stays where it was on entry (128 KiB unless a large block had been freed before). GPU memory
is not affected (PyTorch's CUDA caching allocator already reuses it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
KEEP_TRIM = 2**31 - 1  # mallopt takes an int
RESTORE_TRIM = 64 * 2**20
RESTORE_MMAP_MAX = 65536  # glibc's DEFAULT_MMAP_MAX
_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_active = False


def _glibc():
    """The process's C library if it is glibc and the environment leaves its malloc settings alone, else None."""
    if any(k in os.environ for k in _ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- AttributeError on other C libraries
        return libc
    except (OSError, AttributeError):
        return None


def active() -> bool:
    """Whether the settings are in force now (inside :func:`reuse_freed_memory`, on glibc)."""
    return _active


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Keep freed blocks on the heap for the duration of the block (see the module docstring).

    Yields whether the settings are in force. A nested block leaves the outer one in charge.
    """
    global _active
    if _active:
        yield True
        return
    libc = _glibc()
    if libc is None or libc.mallopt(M_MMAP_MAX, 0) != 1:
        yield False
        return
    libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM)
    _active = True
    try:
        yield True
    finally:
        _active = False
        libc.mallopt(M_MMAP_MAX, RESTORE_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, RESTORE_TRIM)
        libc.malloc_trim(ctypes.c_size_t(0))
