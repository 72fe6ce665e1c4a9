"""Sums whose bits do not depend on the order of their addends: int64 fixed point under a known bound.

Float addition is not associative, so a float sum over calibration batches changes in its last bits
when the batches are added in another order or split over processes, and a last-bit change in a
layer's input moments can flip a near-tied choice of a method. Each addend is rounded once to a
multiple of 2^e, where 2^e is 2^-62 of a bound on the sum's magnitude, and the multiples are added as
int64: integer addition is exact, so one process and any number of ranks give the same bits. An
addend is kept exactly unless it is below 2^-39 of the bound (a float32 value has 24 significant
bits), and each one's rounding error is at most 2^-63 of the bound.
"""
from __future__ import annotations

import math

import numpy as np

HEADROOM_BITS = 62  # |sum| < 2^62 units: the int64 never overflows, however the addends are grouped


class FixedSum:
    """Σ of float arrays of one shape whose magnitudes all add up to at most `bound`."""

    def __init__(self, shape: tuple[int, ...], bound: float):
        self.exp = math.frexp(max(float(bound), 1e-300))[1] - HEADROOM_BITS
        self.units = np.zeros(shape, np.int64)

    def add(self, x: np.ndarray) -> None:
        scaled = np.ldexp(x, -self.exp)
        self.units += np.rint(scaled, out=scaled).astype(np.int64)

    def value(self) -> np.ndarray:
        """The sum as float64 (rounded once, from the exact integer total)."""
        return np.ldexp(self.units.astype(np.float64), self.exp)
