"""Per-channel symmetric weight quantization and the output-error model every method minimises.

A channel's output error for an approximation ŵ is (w − ŵ)ᵀ H (w − ŵ), with H = E[x xᵀ] of the
layer's input patches (one H per conv group). Clipping by this error instead of weight MSE is what
keeps low-bit layers usable (docs/ALGORITHMS.md, uniform).

These sums decide clip ratios, SWIS sets, refitted scales and the allocator's choices, and some
are written into the manifest; they run under `fixed_order` so that they are the same bytes at any
thread count.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from ..intmath import qmax, round_half_up


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


def quantize_symmetric(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Round (C, K) weights to the narrow grid with per-channel scales; int64 result."""
    m = qmax(bits)
    return np.clip(round_half_up(w / scale[:, None]), -m, m).astype(np.int64)


class ErrorModel:
    """Evaluates (w − ŵ)ᵀ H (w − ŵ) per output channel for one layer, batched over candidates."""

    def __init__(self, hessian: np.ndarray | None, channels: int):
        self.h = None if hessian is None else torch.from_numpy(hessian).float()  # (G, K, K)
        self.groups = 1 if hessian is None else hessian.shape[0]
        self.channels = channels

    def hmul(self, a: np.ndarray | torch.Tensor) -> torch.Tensor:
        """H a for every channel of (..., C, K) (a itself when no H is known), float32."""
        d = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a, np.float32))
        if self.h is None:
            return d
        lead, k, g = d.shape[:-2], d.shape[-1], self.groups
        dg = d.reshape(-1, g, self.channels // g, k).permute(1, 0, 2, 3).reshape(g, -1, k)
        with fixed_order():
            hd = torch.bmm(dg, self.h)  # H is symmetric: rows of dg·H are H·d
        return hd.reshape(g, -1, self.channels // g, k).permute(1, 0, 2, 3).reshape(*lead, self.channels, k)

    def __call__(self, diff: np.ndarray) -> np.ndarray:
        """diff: (..., C, K) → (..., C); plain squared error when no H is known."""
        d = torch.from_numpy(np.ascontiguousarray(diff, np.float32))
        return (self.hmul(d) * d).sum(-1).double().numpy()

    def energy(self, w: np.ndarray) -> np.ndarray:
        """wᵀ H w per channel: the channel's output energy, for relative errors."""
        return self(w)

    def inner(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """aᵀ H b per output channel for (C, K) arrays (plain dot products when no H is known)."""
        if self.h is None:
            return (np.asarray(a, np.float64) * np.asarray(b, np.float64)).sum(-1)
        return (self.hmul(a) * torch.from_numpy(np.ascontiguousarray(b, np.float32))).sum(-1).double().numpy()

    def refit_scale(self, w: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Per-channel s minimising the output error of s·q against w: qᵀHw / qᵀHq (the old scale
        where q is all zero)."""
        qq = self.inner(q, q)
        return np.where(qq > 0, self.inner(q, w) / np.where(qq > 0, qq, 1.0), scale)


def ratio_grid(bits: int) -> np.ndarray:
    lo = 0.5 if bits >= 6 else 0.25
    return np.linspace(lo, 1.0, 40)


def clip_search(w: np.ndarray, bits: int, err: ErrorModel | None) -> np.ndarray:
    """Per-channel scale: the clip ratio of max|w| with the least error (output error if `err`)."""
    m = qmax(bits)
    amax = np.abs(w).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    if err is None:
        return amax / m
    best_scale = amax / m
    best_err = np.full(w.shape[0], np.inf)
    for r in ratio_grid(bits):
        scale = amax * r / m
        d = w - quantize_symmetric(w, scale, bits) * scale[:, None]
        e = err(d)
        better = e < best_err
        best_err = np.where(better, e, best_err)
        best_scale = np.where(better, scale, best_scale)
    return best_scale
