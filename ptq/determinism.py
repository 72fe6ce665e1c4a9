"""Torch reductions in a fixed order, so that the same inputs give the same bytes at any thread count."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def fixed_order() -> Iterator[None]:
    """Run torch's reductions single-threaded inside: its BLAS picks a kernel, and so a summation
    order, by the number of threads (float32 and float64 GEMMs of a few rows differ in the last
    bits between 1 and 2 threads), and a last-bit difference here flips a near-tied choice or a
    recorded scale. Single-threaded, the same inputs give the same bytes at any thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


__all__ = ["fixed_order"]
