"""The integer contract's arithmetic: one rounding rule and dyadic multipliers, used everywhere.

Rounding rule: round half up, i.e. floor(v + 1/2). In integers a right shift by n with rounding is
(v + 2^(n-1)) >> n with an arithmetic (flooring) shift. The float reference uses the same rule, so
the simulator and the fake-quant reference can only differ through the dyadic approximation of a
real multiplier and the rounding of the bias.
"""
from __future__ import annotations

import numpy as np
import torch

MANTISSA_BITS = 31  # multipliers m satisfy 2^30 <= m < 2^31
F32_EXACT = 2**24  # every integer below it in magnitude is a float32: integer sums bounded below it are exact


def qmax(bits: int) -> int:
    """Largest magnitude of a signed `bits`-bit integer on the narrow symmetric grid
    [−(2^(b−1)−1), 2^(b−1)−1]: weights, and the limit of a signed accumulator."""
    return (1 << (bits - 1)) - 1


def round_half_up(v: torch.Tensor | np.ndarray):
    """floor(v + 0.5) for float tensors or arrays."""
    if isinstance(v, torch.Tensor):
        return torch.floor(v + 0.5)
    return np.floor(np.asarray(v, dtype=np.float64) + 0.5)


def rounding_shift(v: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Round-half-up right shift of int64 values v by n (n >= 1, broadcastable)."""
    return torch.bitwise_right_shift(v + torch.bitwise_left_shift(torch.ones_like(n), n - 1), n)


F64_EXACT = 2**53  # every integer of smaller magnitude is a float64


def dyadic_sum(parts: list[torch.Tensor], mults: list[torch.Tensor], shift: torch.Tensor,
               bounds: list[torch.Tensor | float]) -> torch.Tensor:
    """round_half_up(Σ_i parts_i · mults_i / 2^shift) for integer-valued tensors, as float64.

    `bounds[i]` bounds |parts_i|; multipliers, shifts and bounds are scalars or per-channel tensors
    broadcast along dim 1. Where Σ bounds_i·mults_i + 2^(shift-1) < 2^52 (one bit of margin for
    this estimate's own rounding) every intermediate is an integer, or a power-of-two scaling of
    one, below 2^53, so the float64 products, sum, offset, scaling and floor are exact and equal the
    int64 rounding shift; the float path is several times faster on CPU than int64 shifts. The
    channels that miss the bound are recomputed in int64.
    """
    shift = torch.as_tensor(shift, dtype=torch.int64)
    mults = [torch.as_tensor(m, dtype=torch.int64) for m in mults]
    need = torch.exp2((shift - 1).to(torch.float64))
    for b, m in zip(bounds, mults):
        need = need + torch.as_tensor(b, dtype=torch.float64) * m.to(torch.float64)
    exact = need < 2.0 ** 52
    if not bool(exact.any()):
        return _int_dyadic_sum(parts, mults, shift)
    total = None
    for p, m in zip(parts, mults):
        prod = p.to(torch.float64) * m.to(torch.float64)
        total = prod if total is None else total.add_(prod)
    total.add_(torch.exp2((shift - 1).to(torch.float64))).mul_(torch.exp2(-shift.to(torch.float64)))
    total = total.floor_()
    if not bool(exact.all()):
        idx = torch.nonzero(~exact.reshape(-1)).reshape(-1)
        pick = (lambda t: t.index_select(1, idx) if t.dim() > 1 and t.shape[1] > 1 else t)
        total.index_copy_(1, idx, _int_dyadic_sum([p.index_select(1, idx) for p in parts],
                                                   [pick(m) for m in mults], pick(shift)))
    return total


def _int_dyadic_sum(parts: list[torch.Tensor], mults: list[torch.Tensor], shift: torch.Tensor) -> torch.Tensor:
    total = sum(p.to(torch.int64) * m for p, m in zip(parts, mults))
    return rounding_shift(total, shift).to(torch.float64)


def dyadic_value(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The real number m / 2^n each (m, n) pair stands for."""
    return np.asarray(m, dtype=np.float64) / np.exp2(np.asarray(n, dtype=np.float64))


def dyadic_shared(multipliers: np.ndarray, max_shift: int = 62) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers M (T, C) → mantissas m (T, C) sharing one right shift n (C,) per column.

    The shift is set by the largest multiplier of each column so its mantissa has 31 bits; terms
    with smaller multipliers get proportionally smaller mantissas. Used where several integer
    accumulators (multipoint terms, the inputs of an add) are summed before one rounding shift.
    """
    M = np.asarray(multipliers, dtype=np.float64)
    if M.ndim == 1:
        M = M[:, None]
    if np.any(~np.isfinite(M)) or np.any(M < 0):
        raise ValueError("dyadic multipliers must be non-negative and finite")
    top = np.maximum(M.max(axis=0), np.finfo(np.float64).tiny)
    _, exp = np.frexp(top)
    n = np.minimum(MANTISSA_BITS - exp, max_shift).astype(np.int64)
    m = np.floor(M * np.exp2(n)[None, :] + 0.5).astype(np.int64)
    over = (m >= 2**MANTISSA_BITS).any(axis=0)
    if np.any(over):
        n[over] -= 1
        m[:, over] = np.floor(M[:, over] * np.exp2(n[over])[None, :] + 0.5).astype(np.int64)
    if np.any(n < 1):
        raise ValueError(f"multiplier {M.max():.3g} is too large for a right-shift requantizer")
    return m, n
