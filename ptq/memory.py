"""Hand freed heap memory back to the operating system between stages.

glibc serves allocations under its mmap threshold (which grows to 32 MB as large blocks are freed)
from the heap, and keeps freed heap pages mapped. A stage that allocates and frees gigabytes of
mid-sized tensors (the Fisher backward pass, the statistics' fixed-point sums) then leaves them in
the process's resident set, and the next stage's peak stacks on top of that garbage: on resnet50
`multipoint` the RSS after the Fisher pass stayed 1.2 GiB above what was live. `malloc_trim`
returns those pages; elsewhere than glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc), so resident memory tracks what is live."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
