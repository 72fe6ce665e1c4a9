"""Helpers every weight method shares: the layer's error model, the allocator's error weights,
and what the rounding engines (rounding, learned) decide and record per layer."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import TypeVar

import numpy as np

from ..calib.progress import progress
from ..determinism import single_threaded_map
from ..ir import Op, WeightQuant
from .errormodel import ErrorModel

R = TypeVar("R")
# A layer whose H takes more than this in float64 is worked on alone: its search or factor work holds
# several such matrices (a 3×3 conv of 512 channels: 170 MB each), and two at once put resnet50 over 4 GB.
ALONE_BYTES = 64 << 20
_ALONE = threading.Lock()


def per_layer(work: Callable[[Op], R], ops: Iterable[Op], stats=None, description: str = "layers") -> list[R]:
    """work(op) for every op, returned in op order, with as many layers at once as torch has threads,
    each single-threaded (`single_threaded_map`): a method's per-layer search uses every core and
    gives the bits of one loop at any thread count. `work` must not depend on another layer's result.
    Layers start largest first (by weight count, the searches' cost): in op order a network's last
    and largest layer (Lite0's classifier: a fifth of SWIS's search) ran alone on one core at the end.
    With `stats`, a layer whose input moments exceed ALONE_BYTES runs while no other such layer
    does (memory, not arithmetic: the results are the same). A progress bar (`description`) advances
    as each layer's result arrives, in the order they started."""
    def bounded(op: Op) -> R:
        li = stats.layer_inputs.get(op.name) if stats is not None else None
        with _ALONE if li is not None and li.full_nbytes > ALONE_BYTES else nullcontext():
            return work(op)

    ops = list(ops)
    start = sorted(range(len(ops)), key=lambda i: -_size(ops[i]))  # stable: equal sizes in op order
    out: list = [None] * len(ops)
    with progress(description, len(ops)) as advance:
        for i, r in zip(start, single_threaded_map(bounded, [ops[i] for i in start])):
            out[i] = r
            advance()
    return out


def _size(op: Op) -> int:
    return 0 if op.weight is None else int(op.weight.size)


def layer_error(op: Op, stats, output_error: bool = True, ridge: float = 0.0) -> ErrorModel:
    """The layer's error evaluator: output error from its input moments H, or weight MSE; its searches
    add the ridge `errormodel.ridge_level` gives (`ridge`: the recipe's `weights.ridge`)."""
    li = stats.layer_inputs.get(op.name) if stats is not None and output_error else None
    return ErrorModel(None, op.weight.shape[0]) if li is None else ErrorModel.of(li, op.weight.shape[0], ridge, stats.samples)


def error_weights(op: Op, stats, err: ErrorModel, w: np.ndarray) -> np.ndarray | float:
    """Per-channel weights that put every layer's output errors in one currency for the allocator:
    the channels' Fisher sensitivity of the final output (`calib.sensitivity`) when measured, else
    1 / the layer's output energy (a relative error)."""
    fisher = stats.fisher.get(op.name) if getattr(stats, "fisher", None) else None
    if fisher is not None:
        return fisher
    return 1.0 / max(float(err.energy(w.astype(np.float32)).sum()), 1e-30)


def rounding_targets(wq: WeightQuant, w: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(term, rows, real target (C, K)) for each term the engine decides: term 0 for single-term
    schemes; for multipoint each channel's last point, against the residual of its earlier points."""
    if wq.scheme["scheme"] != "multipoint":
        return [(0, np.ones(w.shape[0], bool), w)]
    counts = wq.extra["points_per_channel"]
    out, partial = [], np.zeros_like(w)
    for t, (q, s) in enumerate(wq.terms):
        out.append((t, counts == t + 1, w - partial))
        partial = partial + q.reshape(w.shape[0], -1) * s[:, None]
    return [o for o in out if o[1].any()]


def error_record(before: np.ndarray, after: np.ndarray, err: ErrorModel, w: np.ndarray) -> dict[str, float]:
    """The layer's relative output error (Σ error / Σ output energy) with nearest and with the engine."""
    energy = max(float(err.energy(w.astype(np.float32)).sum()), 1e-30)
    return {"error_nearest": round(float(before.sum()) / energy, 9), "error": round(float(after.sum()) / energy, 9)}
