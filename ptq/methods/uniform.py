"""Uniform baseline: per-channel symmetric narrow-range weights with a clipping search."""
from __future__ import annotations

import numpy as np

from ..ir import Graph
from .fields import layer_setting
from .selectors import override_matches
from .errormodel import clip_search, quantize_symmetric
from .registry import register
from ..ir import WeightQuant
from .base import layer_error, per_layer


@register("uniform", override_keys=("weights.bits",), reads_moments=lambda recipe: recipe["weights"]["clip"] == "output")
def quantize(graph: Graph, stats, recipe: dict) -> dict[str, WeightQuant]:
    matches = override_matches(graph, recipe["overrides"])
    ops = graph.weighted_ops()
    return dict(zip((op.name for op in ops), per_layer(
        lambda op: uniform_layer(op, stats, layer_setting(recipe, "weights.bits", op.name, matches), recipe["weights"]["clip"],
                                 recipe["weights"]["ridge"]),
        ops, description="clip search (layers)")))


def uniform_layer(op, stats, bits: int, clip: str, ridge: float = 0.0) -> WeightQuant:
    w = op.weight.reshape(op.weight.shape[0], -1).astype(np.float64)
    err = None if clip == "minmax" else layer_error(op, stats, output_error=clip == "output", ridge=ridge)
    scale = clip_search(w, bits, err)
    q = quantize_symmetric(w, scale, bits).reshape(op.weight.shape)
    return WeightQuant({"scheme": "uniform", "bits": bits, "narrow_range": True}, [(q, scale)], float(bits))
