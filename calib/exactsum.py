"""Sums whose bits do not depend on the order of their addends: int64 fixed point under known bounds.

Float addition is not associative, so a float sum over calibration batches changes in its last bits
when the batches are added in another order or split over processes, and a last-bit change in a
layer's input moments can flip a near-tied choice of a method. Each addend comes with a bound on the
magnitude the whole sum could reach were every addend like it (a batch's own peak times the rows of
the whole calibration set), and is rounded once to a multiple of 2^e, where 2^e is about 2^-60 of that
bound (2^-62 to 2^-58: e is rounded up to a multiple of EXP_STEP, so addends of similar size share
it); the multiples of each 2^e are added as int64. Integer addition is exact, and which e an addend
takes depends on the addend alone, so one process and any number of ranks, in any order, give the
same bits, without knowing the sum's range before the first addend. An addend is kept exactly unless
it is below 2^-34 of its bound (a float32 value has 24 significant bits).
"""
from __future__ import annotations

import math

import numpy as np

HEADROOM_BITS = 62  # |sum| < 2^62 units: the int64 never overflows, however the addends are grouped
EXP_STEP = 4  # an addend's exponent is rounded up to a multiple of this: peaks within 2× share one


def unit_exponent(bound: float) -> int:
    """The exponent e of the units an addend bounded (as a whole sum) by `bound` is rounded to."""
    e = math.frexp(max(float(bound), 1e-300))[1] - HEADROOM_BITS
    return -(-e // EXP_STEP) * EXP_STEP


class FixedSum:
    """Σ of float arrays of one shape; each addend's `bound` covers the whole sum were every addend
    as large as it, so the units of each exponent never overflow."""

    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.units: dict[int, np.ndarray] = {}  # exponent e → Σ of addends in units of 2^e

    def add(self, x: np.ndarray, bound: float) -> None:
        e = unit_exponent(bound)
        scaled = np.ldexp(x, -e)
        rounded = np.rint(scaled, out=scaled).astype(np.int64)
        if e in self.units:
            self.units[e] += rounded
        else:
            self.units[e] = rounded

    def value(self) -> np.ndarray:
        """The sum as float64: each exponent's exact integer total, added smallest exponent first."""
        total = np.zeros(self.shape)
        for e in sorted(self.units):
            total += np.ldexp(self.units[e].astype(np.float64), e)
        return total
