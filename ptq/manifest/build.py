"""From (graph, statistics, recipe, integer weights) to a complete manifest.

Pure bookkeeping of the integer contract: activation encodings from the observers, integer
biases at scale s_w·s_x, dyadic requantizers, clamp bounds of fused activations, lookup tables,
and the data-free accumulator bound of every layer.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .. import accbound, intnorm
from ..calib.collect import Statistics
from ..calib.observers import Encoding, choose_encodings, is_encoder
from ..intmath import dyadic_shared, round_half_up
from ..ir import Graph, Op, WeightQuant, require_all
from ..ir.grids import onto_grid
from ..ir.floatops import lut_function
from .format import FORMAT, VERSION, Manifest

INT32_MAX = 2**31 - 1


def quantize_value(v: float, e: Encoding) -> int:
    return int(np.clip(math.floor(v / e.scale + 0.5) + e.zero_point, e.qmin, e.qmax))


def clamp_bounds(act: list | None, e: Encoding) -> list[int]:
    """Integer bounds of a fused clamp in encoding e (quantization is monotone, so this is exact)."""
    lo, hi = e.qmin, e.qmax
    if act is not None:
        if act[0] is not None:
            lo = max(lo, quantize_value(act[0], e))
        if act[1] is not None:
            hi = min(hi, quantize_value(act[1], e))
    return [lo, hi]


def int_dtype(bits: int) -> np.dtype:
    return np.dtype(np.int8) if bits <= 8 else np.dtype(np.int16) if bits <= 16 else np.dtype(np.int32)


def set_bias(m: Manifest, rec: dict, bias: np.ndarray, corrected: bool | None = None) -> None:
    """Store a layer's float bias and its int32 version at scale s_x·scale_0 (saturating)."""
    name = rec["name"]
    s_x = m.encoding(rec["inputs"][0])["scale"]
    s0 = m.tensor(rec["weight"]["terms"][0]["scale"])
    q = round_half_up(bias / (s_x * s0))
    up = down = np.full(q.shape, float(INT32_MAX))
    p = rec.get("accumulator", {}).get("bits", 32)
    if p < 32:  # keep the declared accumulator overflow-free: the bias gets what the weights leave on each side
        reach_up, reach_down = weight_reach(m, rec)
        up, down = np.maximum(accbound.limit(p) - reach_up, 0.0), np.maximum(accbound.limit(p) - reach_down, 0.0)
    saturated = int(np.sum((q > up) | (q < -down)))
    q = np.clip(q, -down, up).astype(np.int32)
    rec["bias"] = {"q": m.put(f"{name}/bias.q", q), "float": m.put(f"{name}/bias.float", bias.astype(np.float64)),
                   "bits": 32, "saturated": saturated,
                   "corrected": rec.get("bias", {}).get("corrected", False) if corrected is None else corrected}
    rec["accumulator"] = data_free_bound(m, rec)


def input_span(m: Manifest, rec: dict) -> tuple[int, int]:
    e = m.encoding(rec["inputs"][0])
    return accbound.input_span(e["bits"], e["zero_point"])


def weight_reach(m: Manifest, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the largest acc and −acc from the weights alone over the layer's input span
    (`accbound.reach`; the sign masses summed over all terms: multipoint points add up in one
    accumulator)."""
    pos = neg = 0.0
    for t in rec["weight"]["terms"]:
        p_t, n_t = accbound.sign_masses(m.tensor(t["q"]))
        pos, neg = pos + p_t, neg + n_t
    return accbound.reach(pos, neg, *input_span(m, rec))


def data_free_bound(m: Manifest, rec: dict) -> dict:
    """The worst |partial sum| of acc per channel over every input in the span, in any order, with the
    bias (`accbound.worst_from_reach`, over all terms): the accumulator width that never overflows.

    `bound` names the tightest bound the layer meets at its declared width: "data-type" (from the
    widths alone, de Bruin), "weight-level" (from its integer weights, exact over the input span:
    A2Q's for two-sided inputs, A2Q+'s per sign for one-sided ones) or "none".
    """
    lo, hi = input_span(m, rec)
    bias = m.tensor(rec["bias"]["q"]).astype(np.float64)
    worst = int(accbound.worst_from_reach(*weight_reach(m, rec), bias).max(initial=0))
    prev = rec.get("accumulator", {})
    p = prev.get("bits", 32)
    w = rec["weight"]
    k = int(np.prod(w["shape"][1:]))
    by_type = len(w["terms"]) * accbound.datatype_bound(k, max(hi, -lo), int(w.get("bits", 8)), float(np.abs(bias).max(initial=0)))
    bound = "data-type" if by_type <= accbound.limit(p) else "weight-level" if worst <= accbound.limit(p) else "none"
    return {"bits": p, "mode": prev.get("mode", "exact"), "bound": bound,
            "data_free_max": worst, "data_free_bits": int(math.ceil(math.log2(worst + 1))) + 1}


BIAS_HEADROOM = 16  # the int32 bias keeps this factor of room for later bias correction


def fit_bias_scale(wq: WeightQuant, bias: np.ndarray, s_x: float) -> None:
    """Raise term-0 scales where the bias would not fit int32 at scale s_x·scale.

    Happens on near-dead channels (BatchNorm folded to weights ~1e-9 with a real bias). Their
    integers are mapped onto the coarser scale by the scheme's own grid (`ir.grids.onto_grid`: plain
    rounding is not on a SWIS group's shift set), which leaves them near zero as they were.
    """
    q, s = wq.terms[0]
    floor = np.abs(bias) * BIAS_HEADROOM / (s_x * INT32_MAX)
    low = s < floor
    if np.any(low):
        new = np.where(low, floor, s)
        rows = low.reshape(-1, *([1] * (q.ndim - 1)))
        wq.terms[0] = (q, new)
        onto_grid(wq, q * (s / new).reshape(rows.shape), rows)


def _weighted(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    """conv / linear: integer terms, int32 bias, per-channel dyadic requantizers, fused clamp, accumulator."""
    wq: WeightQuant = ctx["weights"][op.name]
    name = op.name
    x, y = enc[op.inputs[0]], enc[op.output]
    bias = wq.float_bias(op.bias).astype(np.float64)
    fit_bias_scale(wq, bias, x.scale)
    terms = []
    for t, (q, s) in enumerate(wq.terms):
        bits = wq.scheme.get("bits", 8)
        terms.append({"q": m.put(f"{name}/w{t}.q", q.astype(int_dtype(bits))),
                      "scale": m.put(f"{name}/w{t}.scale", np.asarray(s, np.float64))})
    weight = dict(wq.scheme)
    weight.update(shape=list(op.weight.shape), terms=terms, bits_per_weight=wq.bits)
    if wq.extra:
        weight["extra"] = {k: m.put(f"{name}/{k}", v) for k, v in sorted(wq.extra.items())}
    M = np.stack([x.scale * np.asarray(s, np.float64) / y.scale for _, s in wq.terms])
    mult, shift = dyadic_shared(M)
    acc = ctx["accumulator"]
    rec = {**_head(op), "attrs": dict(op.attrs), "weight": weight,
           "requant": {"multiplier": m.put(f"{name}/requant.m", mult), "shift": m.put(f"{name}/requant.n", shift)},
           "clamp": clamp_bounds(op.attrs.get("act"), y),
           "accumulator": {"bits": acc["bits"], "mode": acc["mode"]}}
    set_bias(m, rec, bias, corrected=False)
    return rec


def _add_or_concat(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    y = enc[op.output]
    mult, shift = dyadic_shared(np.array([[enc[t].scale / y.scale] for t in op.inputs]))
    return {"requant": {"multiplier": [int(v) for v in mult[:, 0]], "shift": int(shift[0])},
            "clamp": clamp_bounds(op.attrs.get("act"), y)}


def _avgpool(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    y, x = enc[op.output], enc[op.inputs[0]]
    in_shape = ctx["shapes"][op.inputs[0]]
    count = in_shape[1] * in_shape[2] if op.attrs.get("global") else op.attrs["kernel"][0] * op.attrs["kernel"][1]
    mult, shift = dyadic_shared(np.array([[x.scale / (y.scale * count)]]))
    return {"requant": {"multiplier": [int(mult[0, 0])], "shift": int(shift[0]), "count": int(count)},
            "clamp": clamp_bounds(op.attrs.get("act"), y)}


def _lut(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    x, y = enc[op.inputs[0]], enc[op.output]
    q = torch.arange(x.qmin, x.qmax + 1, dtype=torch.float64)
    v = lut_function(op.attrs["function"])(x.scale * (q - x.zero_point)).numpy()
    table = np.clip(np.floor(v / y.scale + 0.5) + y.zero_point, y.qmin, y.qmax).astype(np.int32)
    return {"table": m.put(f"{op.name}/table", table)}


def _scaling(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    """matmul (real factor alpha·s_a·s_b/s_y on Σ(a − z_a)(b − z_b)) and scale (factor·s_x/s_y on x − z_x):
    one dyadic multiplier and shift."""
    y = enc[op.output]
    if op.kind == "matmul":
        ratio = op.attrs["alpha"] * enc[op.inputs[0]].scale * enc[op.inputs[1]].scale / y.scale
    else:
        ratio = op.attrs["factor"] * enc[op.inputs[0]].scale / y.scale
    mult, shift = dyadic_shared(np.array([[ratio]]))
    return {"requant": {"multiplier": [int(mult[0, 0])], "shift": int(shift[0])},
            "clamp": clamp_bounds(op.attrs.get("act"), y)}


def _layernorm(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    """Integer LayerNorm (README, Transformers): the integer ε, and per channel j the signed dyadic
    multiplier m_j/2^n_j ≈ γ_j·√D/(s_y·2^K) and the bias round(β_j·2^n_j/s_y) of the output requantizer."""
    x, y = enc[op.inputs[0]], enc[op.output]
    d = int(op.attrs["out_shape"][-1])
    gamma, beta = (op.params[k].astype(np.float64) for k in ("gamma", "beta"))
    k = intnorm.FRAC_BITS
    ratio = gamma * math.sqrt(d) / (y.scale * 2.0 ** k)
    mult, shift = dyadic_shared(np.abs(ratio).reshape(1, -1), max_shift=intnorm.MAX_SHIFT)
    bias = np.floor(beta / y.scale * np.exp2(shift) + 0.5)
    if np.abs(bias).max(initial=0) >= 2.0 ** 61:
        raise ValueError(f"layer {op.name}: LayerNorm bias {np.abs(beta).max():.3g} is too large for its output scale {y.scale:.3g}")
    eps_q = int(np.floor(d ** 3 * op.attrs["eps"] / x.scale ** 2 + 0.5))
    name = op.name
    return {"norm": {"eps_q": eps_q, "frac_bits": k,
                     "multiplier": m.put(f"{name}/norm.m", (np.sign(gamma) * mult[0]).astype(np.int64)),
                     "shift": m.put(f"{name}/norm.n", shift.astype(np.int64)),
                     "bias": m.put(f"{name}/norm.bias", bias.astype(np.int64)),
                     "gamma": m.put(f"{name}/gamma", gamma), "beta": m.put(f"{name}/beta", beta)},
            "clamp": clamp_bounds(op.attrs.get("act"), y)}


def _softmax(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    """Integer softmax (README, Transformers): the table E[d] = round(2^F·exp(−s_x·d)) of code distances
    d below the row's maximum, cut after its first zero, and the dyadic 1/s_y."""
    x, y = enc[op.inputs[0]], enc[op.output]
    f = intnorm.EXP_BITS
    d = np.arange(1 << x.bits, dtype=np.float64)
    table = np.floor(np.exp2(f) * np.exp(-x.scale * d) + 0.5).astype(np.int64)
    zeros = np.flatnonzero(table == 0)
    if zeros.size:
        table = table[: zeros[0] + 1]
    mult, shift = dyadic_shared(np.array([[1.0 / y.scale]]))
    return {"exp": {"table": m.put(f"{op.name}/exp", table), "frac_bits": f,
                    "multiplier": int(mult[0, 0]), "shift": int(shift[0])}}


def _embedding(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    """Rows of the table and of the constant offset (position rows) rounded to the output scale, int32:
    y = Tw[id] + To[position] + z_y, clipped."""
    x, y = enc[op.inputs[0]], enc[op.output]
    if (x.bits, x.scale, x.zero_point) != (16, 1.0, 0):
        raise ValueError(f"embedding {op.name}: its input must carry the identity encoding (token ids)")
    table, offset = (np.floor(op.params[k].astype(np.float64) / y.scale + 0.5) for k in ("table", "offset"))
    if max(np.abs(table).max(), np.abs(offset).max()) >= 2**31:
        raise ValueError(f"embedding {op.name}: rows too large for int32 codes at scale {y.scale:.3g}")
    return {"embedding": {"table": m.put(f"{op.name}/table", table.astype(np.int32)),
                          "offset": m.put(f"{op.name}/offset", offset.astype(np.int32))}}


def _offset(m: Manifest, op: Op, enc: dict[str, Encoding], ctx: dict) -> dict:
    """x rescaled to the output scale by one dyadic multiplier, padded with zeros where the constant
    rows go, plus the constant rounded to the output scale (int32): y = pad(round(u·s_x/s_y)) + K + z_y."""
    x, y = enc[op.inputs[0]], enc[op.output]
    mult, shift = dyadic_shared(np.array([[x.scale / y.scale]]))
    k = np.floor(op.params["offset"].astype(np.float64) / y.scale + 0.5)
    if np.abs(k).max(initial=0) >= 2**31:
        raise ValueError(f"op {op.name}: constant too large for int32 codes at scale {y.scale:.3g}")
    return {"requant": {"multiplier": [int(mult[0, 0])], "shift": int(shift[0])},
            "offset": m.put(f"{op.name}/offset", k.astype(np.int32)), "clamp": clamp_bounds(op.attrs.get("act"), y)}


# the kind-specific fields of each op's manifest record (the op table lists which fields each kind has)
RECORDERS = require_all("manifest", {
    "conv": _weighted, "linear": _weighted, "add": _add_or_concat, "concat": _add_or_concat,
    "avgpool": _avgpool, "lut": _lut,
    "clamp": lambda m, op, enc, ctx: {"clamp": clamp_bounds(op.attrs.get("act"), enc[op.output])},
    "pad": lambda m, op, enc, ctx: {"pad_value": quantize_value(op.attrs["value"], enc[op.output])},
    "maxpool": lambda m, op, enc, ctx: {"pad_value": enc[op.output].qmin},
    "reshape": lambda m, op, enc, ctx: {},
    "matmul": _scaling, "scale": _scaling, "layernorm": _layernorm, "softmax": _softmax, "embedding": _embedding,
    "offset": _offset, "permute": lambda m, op, enc, ctx: {}, "slice": lambda m, op, enc, ctx: {},
})


def _head(op: Op) -> dict[str, Any]:
    return {"name": op.name, "kind": op.kind, "inputs": list(op.inputs), "output": op.output}


def recorded_recipe(graph: Graph, recipe: dict) -> dict:
    """The recipe as the manifest records it: the [encoder] section only where it applies (a graph
    with LayerNorm), so a CNN's manifest carries no setting that cannot affect it."""
    return recipe if is_encoder(graph) else {k: v for k, v in recipe.items() if k != "encoder"}


def build_manifest(graph: Graph, stats: Statistics, recipe: dict, weights: dict[str, WeightQuant],
                   header: dict[str, Any]) -> Manifest:
    """Assemble the manifest; `header` carries model, calibration and provenance fields."""
    enc = choose_encodings(graph, stats.histograms, recipe, weights)
    m = Manifest({"format": FORMAT, "version": VERSION, **header, "recipe": recorded_recipe(graph, recipe)})
    shapes = {graph.input: list(graph.input_shape)}
    for op in graph.ops:
        shapes[op.output] = op.attrs["out_shape"]
    ops: list[dict] = []
    m.data["graph"] = {"input": graph.input, "input_shape": list(graph.input_shape), "outputs": list(graph.outputs),
                       "encodings": {t: e.to_dict() for t, e in sorted(enc.items())}, "ops": ops}
    ctx = {"weights": weights, "accumulator": recipe["accumulator"], "shapes": shapes}
    for op in graph.ops:
        attrs = dict(op.attrs)
        if op.kind == "avgpool":  # the executors need the pooled input's size; the captured graph is not changed
            attrs["in_shape"] = shapes[op.inputs[0]]
        ops.append({**_head(op), "attrs": attrs, **RECORDERS[op.kind](m, op, enc, ctx)})
    return m


__all__ = ["build_manifest", "set_bias"]
