"""Helpers every weight method shares: the layer's error model and the allocator's error weights."""
from __future__ import annotations

import numpy as np

from ..ir import Op
from .errormodel import ErrorModel


def layer_error(op: Op, stats, output_error: bool = True) -> ErrorModel:
    """The layer's error evaluator: output error from its input moments H, or weight MSE."""
    li = stats.layer_inputs.get(op.name) if stats is not None and output_error else None
    return ErrorModel(None if li is None else li.hessian, op.weight.shape[0])


def error_weights(op: Op, stats, err: ErrorModel, w: np.ndarray) -> np.ndarray | float:
    """Per-channel weights that put every layer's output errors in one currency for the allocator:
    the channels' Fisher sensitivity of the final output (`calib.sensitivity`) when measured, else
    1 / the layer's output energy (a relative error)."""
    fisher = stats.fisher.get(op.name) if getattr(stats, "fisher", None) else None
    if fisher is not None:
        return fisher
    return 1.0 / max(float(err.energy(w.astype(np.float32)).sum()), 1e-30)
