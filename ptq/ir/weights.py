"""What a weight method hands to the manifest builder for each layer: integer GEMM terms with
per-channel scales and the scheme's own fields. It sits in the IR layer because both the methods
(which produce it) and the manifest (which stores it) use it, and neither may import the other."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass
class WeightQuant:
    """Weights as a sum of integer tensors with per-channel scales: ŵ = Σ_t scale_t[c] · q_t.

    Uniform has one term, multipoint one per point. `scheme` holds the JSON fields of the
    manifest's tagged union, `extra` any further tensors of the scheme, `bits` the effective
    storage bits per weight.
    """

    scheme: dict[str, Any]
    terms: list[tuple[np.ndarray, np.ndarray]]  # (q int64 shaped like the weight, scale (C,) float64)
    bits: float
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    input_bits: int | None = None  # a width chosen for the input tensor (allocator methods), else the recipe's
    acc_budget: np.ndarray | None = None  # (C, 3) most Σq⁺, Σq⁻, Σ|q| per channel that keep its accumulator bound (not stored)
    bias: np.ndarray | None = None  # (C,) float64: the bias learned with the rounding (`rounding.bias_rate`), else the op's

    def stored(self, dtype: type = np.int8) -> "WeightQuant":
        """The same weights with each term's integers held as `dtype`: an allocator's candidates are
        kept in int8 (their widths are ≤ 8 bits) until one per layer is chosen, then widened back to
        int64 — several candidates per layer of a 25 M-weight network would take gigabytes in int64."""
        return replace(self, terms=[(q.astype(dtype), s) for q, s in self.terms])

    def dequantized(self) -> np.ndarray:
        out = None
        for q, s in self.terms:
            t = q.astype(np.float64) * s.reshape(-1, *([1] * (q.ndim - 1)))
            out = t if out is None else out + t
        return out

    def float_bias(self, op_bias: np.ndarray | None) -> np.ndarray | None:
        """The layer's float bias in the quantized model: the learned one where there is one, else the op's."""
        return op_bias if self.bias is None else self.bias


class LayerWeights(dict):
    """{op name: WeightQuant}, plus `info`: what the method records in the manifest (e.g. the
    allocator's solver and status), and `timings`: wall-clock seconds for the report only, so that
    the manifest stays byte-identical from run to run."""

    def __init__(self, weights: dict[str, WeightQuant], info: dict[str, Any], timings: dict[str, float] | None = None):
        super().__init__(weights)
        self.info = info
        self.timings = timings or {}
