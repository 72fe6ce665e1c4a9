"""Torch reductions in a fixed order, so that the same inputs give the same bytes at any thread count; and the platform those bytes still depend on."""
from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")
R = TypeVar("R")


def platform_record() -> dict[str, str]:
    """What a manifest's bytes depend on besides its inputs and seed: torch's and numpy's versions and
    the CPU's vector kernels (torch's dispatch level). Float32 convolutions and products sum in the
    order those kernels choose, and error feedback and learned rounding carry a last-bit difference
    into other integers: on another CPU a low-bit recipe's figures move as with another calibration
    draw (BENCHMARKS.md, session 28)."""
    return {"torch": torch.__version__, "numpy": np.__version__, "cpu_kernels": torch.backends.cpu.get_cpu_capability()}


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


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Torch's thread count n inside, e.g. for elementwise work inside a `fixed_order` region: an
    elementwise op computes each value on its own, so its bits do not depend on the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch single-threaded. The count `torch.set_num_threads` gives
    torch's BLAS and OpenMP libraries is per thread: after `set_num_threads(1)` in the caller
    (`fixed_order`) a new thread's kernels ran at their default, every core, while
    `torch.get_num_threads()` there said 1. A conv's gradient then summed
    in another order on 2 threads than on 1 (an AVX-512 CPU: a learned bias 5·10⁻⁸ apart), and two
    workers ran four threads on two cores. Each thread sets its own count as it starts."""
    return ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))


def single_threaded_map(work: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """work(item) for each item, in item order, each call single-threaded (`fixed_order`) but up to
    `workers` calls at once (default: torch's thread count) on a thread pool, at most two per worker
    in flight. Each call's arithmetic is then the same at any thread count, and the cores still all
    work: torch releases the GIL inside its ops. Grad mode is per thread: `work` sets its own."""
    n = workers or torch.get_num_threads()
    with fixed_order():
        if n <= 1:
            for item in items:
                yield work(item)
            return
        with single_threaded_pool(n) as pool:
            pending: deque = deque()
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= 2 * n:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


__all__ = ["fixed_order", "single_threaded_map", "single_threaded_pool", "threads"]
