"""What a method returns for one layer: integer GEMM terms and the scheme's own fields."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..graph import Graph, Op
from ..weightquant import OutputError


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

    def dequantized(self) -> np.ndarray:
        out = None
        for q, s in self.terms:
            t = q.astype(np.float64) * s.reshape(-1, *([1] * (q.ndim - 1)))
            out = t if out is None else out + t
        return out


class LayerWeights(dict):
    """{op name: WeightQuant}, plus `info`: what the method records in the manifest (e.g. the
    allocator's solver and status), and `timings`: wall-clock seconds for the report only, so that
    the manifest stays byte-identical from run to run."""

    def __init__(self, weights: dict[str, WeightQuant], info: dict[str, Any], timings: dict[str, float] | None = None):
        super().__init__(weights)
        self.info = info
        self.timings = timings or {}


def layer_error(op: Op, stats, output_error: bool = True) -> OutputError:
    """The layer's error evaluator: output error from its input moments H, or weight MSE."""
    li = stats.layer_inputs.get(op.name) if stats is not None and output_error else None
    return OutputError(None if li is None else li.hessian, op.weight.shape[0])


def error_weights(op: Op, stats, err: OutputError, w: np.ndarray) -> np.ndarray | float:
    """Per-channel weights that put every layer's output errors in one currency for the allocator:
    the channels' Fisher sensitivity of the final output (`calib.sensitivity`) when measured, else
    1 / the layer's output energy (a relative error)."""
    fisher = stats.fisher.get(op.name) if getattr(stats, "fisher", None) else None
    if fisher is not None:
        return fisher
    return 1.0 / max(float(err.energy(w.astype(np.float32)).sum()), 1e-30)


def first_last(graph: Graph) -> tuple[str, str]:
    w = graph.weighted_ops()
    return w[0].name, w[-1].name
