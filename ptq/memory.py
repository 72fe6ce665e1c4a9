"""Reuse freed memory within a stage, and hand it back to the operating system between stages.

glibc serves allocations under its mmap threshold (which grows to 32 MB as large blocks are freed)
from the heap, and keeps freed heap pages mapped. A stage that allocates and frees gigabytes of
mid-sized tensors (the Fisher backward pass, the statistics' fixed-point sums) then leaves them in
the process's resident set, and the next stage's peak stacks on top of that garbage: on resnet50
`multipoint` the RSS after the Fisher pass stayed 1.2 GiB above what was live. `malloc_trim`
returns those pages; elsewhere than glibc this does nothing.

Above the mmap threshold the opposite happens: each tensor is a fresh mapping whose pages the kernel
faults in and zeroes, and which goes back to the OS when freed. On Lite0 a mini-batch of 8 samples'
96×112×112 float32 maps is 38 MB, over the 32 MB the threshold grows to, and an elementwise op that
allocates its output took 29 ms where the same op writing into a reused block takes 4
(BENCHMARKS.md, session 29). `reuse_freed_memory` raises the threshold, so such blocks are served
from the heap and reused, and `release_freed_memory` still returns them between stages (and, in bias
correction, between ops).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


@functools.cache
def _libc_function(name: str):
    """A glibc function by name, or None where the C library has none (macOS, musl, Windows)."""
    lib = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(lib), name, None) if lib else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc), so resident memory tracks what is live."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# Blocks up to MMAP_BYTES come from the heap: a mini-batch's temporaries (38 MB on Lite0), while
# whole-calibration maps stay mappings of their own that go back to the OS when freed; with 1 GiB
# Lite0 `w8a8` peaked at 3.36 GiB in bias correction, with 64 MB at 3.17, as fast. The heap's free
# top is kept up to TRIM_BYTES between `release_freed_memory` calls. One arena: a worker thread's
# own arena grows in 64 MB heaps that such blocks soon overflow into mappings again.
MMAP_BYTES = 64 << 20
TRIM_BYTES = 256 << 20
ARENAS = 1


def reuse_freed_memory() -> bool:
    """Serve blocks up to `MMAP_BYTES` from glibc's heap, where freed blocks are reused without page
    faults, for the rest of the process; returns whether it did. Left alone where the C library is
    not glibc, or where the user tuned glibc's allocator (GLIBC_TUNABLES or MALLOC_*): theirs wins."""
    mallopt = _libc_function("mallopt")
    if mallopt is None or "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, MMAP_BYTES), (_M_TRIM_THRESHOLD, TRIM_BYTES), (_M_ARENA_MAX, ARENAS)))
