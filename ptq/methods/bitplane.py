"""Bit-plane allocation: a training-free approximation to BSQ (Yang et al., ICLR 2021).

BSQ trains every bit plane of every layer and lets a group-Lasso penalty drive whole planes to zero;
all-zero planes at the MSB end are dropped for free, at the LSB end the step doubles. Without
training we measure instead of learn. Each layer is quantized to b₀ bits (per-channel scales from the
output-error clipping search) and decomposed into magnitude planes; the all-zero MSB planes of the
layer are dropped for free (this changes no weight). A layer kept at b bits keeps a window of b − 1
consecutive magnitude planes of that grid: the LSB planes below it are removed by re-quantizing with
the doubled step (not truncating), the MSB planes above it — if any are not empty — by clipping. The
window with the least output error is the layer's b-bit candidate; its cost is params·b. The shared
allocator (`ptq.methods.allocator`) then picks one b per layer under the mean-bits budget (and the accumulator
limit, when the recipe sets one): cheapest planes first, by output error added per weight bit saved,
solved exactly as an integer program rather than one plane at a time.

Error currency across layers: the channel's output error δwᵀHδw (H from the layer's calibration
inputs) weighted by the channel's Fisher sensitivity (`calib.sensitivity`), as for the accumulator
method. The data-free variant (`bitplane.error = "weight"`) measures planes on the weights alone
(H = I, each layer's error relative to its weight energy) — the ablation of the issue.
"""
from __future__ import annotations

import numpy as np

from ..calib.observers import choose_encoding

from ..accbound import bits_for, input_span, worst_accumulator
from .allocator import Candidate, LayerChoices, solve_allocation
from ..errors import BudgetError, RecipeError
from ..ir import Graph, Op
from ..intmath import round_half_up
from .fields import Field, layer_setting
from .selectors import override_matches
from .errormodel import ErrorModel, clip_search, quantize_symmetric
from .registry import register
from ..ir import LayerWeights, WeightQuant
from .base import error_weights, layer_error, per_layer

BITPLANE_SECTION = {
    "bits": Field(8, int, lo=3, hi=8, help="b₀: the grid every layer starts from"),
    "mean_bits": Field(4.0, float, lo=2.0, hi=8.0, help="budget: parameter-weighted mean weight bits"),
    "min_bits": Field(2, int, lo=2, hi=8, help="fewest bits (sign + planes) any layer may keep"),
    "error": Field("output", str, ("output", "weight"),
                   help="plane cost measured on the layer output (calibration inputs) or on the weights alone (data-free)"),
    "msb_clip": Field(2, int, lo=0, hi=4, help="non-empty MSB planes a window may drop (clipping by 2, 4, ...)"),
    "reclip": Field(True, bool, help="also try a b-bit grid clipped by output error; keep whichever window errs less"),
    "layer_bits": Field(0, int, lo=0, hi=8, help="per-layer pin of the kept bits (0: free)"),
}


def plane_density(q: np.ndarray, bits: int) -> np.ndarray:
    """Fraction of weights with each magnitude bit set, LSB first: shape (bits − 1,)."""
    mag = np.abs(q).astype(np.int64).ravel()
    return np.array([float(np.mean((mag >> p) & 1)) for p in range(bits - 1)])


def slice_sparsity(q: np.ndarray, bits: int, width: int = 2) -> float:
    """Share of all-zero `width`-bit slices of the magnitudes (the ReRAM bit-slice statistic)."""
    mag = np.abs(q).astype(np.int64).ravel()
    slices = [(mag >> p) & ((1 << width) - 1) for p in range(0, bits - 1, width)]
    return float(np.mean(np.stack(slices) == 0)) if mag.size else 1.0


def top_plane(q: np.ndarray) -> int:
    """Index of the highest non-empty magnitude plane of a layer (−1 when all weights are zero)."""
    return int(np.abs(q).max()).bit_length() - 1


def window(w: np.ndarray, step: np.ndarray, keep: int, lsb: int) -> np.ndarray:
    """Integer weights keeping `keep` magnitude planes above `lsb` dropped ones: step·2^lsb, re-rounded."""
    return quantize_symmetric(w, step * float(1 << lsb), keep + 1)


def layer_candidates(op: Op, stats, recipe: dict, span: tuple[int, int] | None, input_scale: float | None) -> list[Candidate]:
    """One candidate per kept width b: the best plane window at b bits, with its error and cost."""
    bp = recipe["bitplane"]
    b0 = bp["bits"]
    c = op.weight.shape[0]
    w = op.weight.reshape(c, -1).astype(np.float64)
    if bp["error"] == "output":
        err = layer_error(op, stats, ridge=recipe["weights"]["ridge"])
        weight = error_weights(op, stats, err, w)
    else:
        err = ErrorModel(None, c)
        weight = 1.0 / max(float((w * w).sum()), 1e-30)
    step = clip_search(w, b0, err)
    q0 = quantize_symmetric(w, step, b0)
    top = top_plane(q0)
    planes = max(top + 1, 1)  # magnitude planes left after the free MSB drop (one for an all-zero layer)
    density = plane_density(q0, b0)
    bias = op.bias.astype(np.float64) if op.bias is not None else np.zeros(c)
    out = []
    for b in range(min(bp["min_bits"], planes + 1), planes + 2):
        keep = b - 1
        best = None
        for clip in range(min(bp["msb_clip"], planes - keep) + 1):
            lsb = planes - keep - clip
            q = window(w, step, keep, lsb)
            e = float(np.sum(weight * err((w - q * (step * float(1 << lsb))[:, None]).astype(np.float32))))
            if best is None or e < best[0]:
                best = (e, clip, lsb, q)
        e, clip, lsb, q = best
        s = step * float(1 << lsb)
        grid = "planes"
        if bp["reclip"] and b < b0:  # a b-bit grid of its own, clipped by output error, where it is better
            s2 = clip_search(w, b, err)
            q2 = quantize_symmetric(w, s2, b)
            e2 = float(np.sum(weight * err((w - q2 * s2[:, None]).astype(np.float32))))
            if e2 < e:
                e, q, s, grid = e2, q2, s2, "reclipped"
        need = 0
        if span is not None:
            bq = round_half_up(bias / (input_scale * s))
            need = int(bits_for(worst_accumulator(q, *span, bq).max()))
        info = {"grid": grid, "kept_planes": [lsb, lsb + keep - 1], "msb_free": b0 - 1 - planes, "msb_clipped": clip,
                "lsb_dropped": lsb, "density": [round(v, 6) for v in density],
                "slice2_sparsity": round(slice_sparsity(q, b), 6)}
        wq = WeightQuant({"scheme": "uniform", "bits": b, "narrow_range": True, "bitplanes": info},
                         [(q.reshape(op.weight.shape), s)], float(b)).stored()
        out.append(Candidate({"weight_bits": b}, e, {"weight_bits": float(w.size * b)}, need, wq))
    return out


@register("bitplane", sections={"bitplane": BITPLANE_SECTION}, override_keys=("bitplane.layer_bits",),
          reads_fisher=lambda recipe: recipe["bitplane"]["error"] == "output")
def quantize(graph: Graph, stats, recipe: dict) -> dict[str, WeightQuant]:
    bp, act = recipe["bitplane"], recipe["activations"]
    if bp["min_bits"] > bp["bits"]:
        raise RecipeError(f"bitplane.min_bits = {bp['min_bits']} exceeds bitplane.bits = {bp['bits']}; lower it")
    p = recipe["accumulator"]["bits"]
    matches = override_matches(graph, recipe["overrides"])
    src, producers = graph.encoding_source(), graph.producers()
    ops = graph.weighted_ops()

    def candidates(op: Op) -> list[Candidate]:
        span = xscale = None
        if p < 32:  # candidates must fit the accumulator with the recipe's activation widths
            t = src[op.inputs[0]]
            prod = producers.get(t)
            e = choose_encoding(stats.histograms[t], act["bits"], act["observer"], act["percentile"],
                                prod.attrs.get("act") if prod is not None else None)
            span, xscale = input_span(e.bits, e.zero_point), e.scale
        return layer_candidates(op, stats, recipe, span, xscale)

    layers, params = [], 0.0
    for op, cands in zip(ops, per_layer(candidates, ops, description="bit-plane candidates (layers)")):
        pin = layer_setting(recipe, "bitplane.layer_bits", op.name, matches)
        lc = LayerChoices(op.name, None, cands)
        if pin:
            lc.pinned = min(range(len(cands)), key=lambda j: abs(cands[j].knobs["weight_bits"] - pin))
        layers.append(lc)
        params += float(op.weight.size)
    try:
        a = solve_allocation(layers, {"weight_bits": bp["mean_bits"] * params}, p if p < 32 else None)
    except BudgetError as exc:
        if exc.key == "weight_bits":
            least = exc.least / params
            limits = [f"bitplane.min_bits = {bp['min_bits']}", "the recipe's pins"] + ([f"{p}-bit accumulators"] if p < 32 else [])
            raise BudgetError(f"bitplane.mean_bits = {bp['mean_bits']:g} cannot be met with {', '.join(limits[:-1])} and {limits[-1]}: "
                              f"the least is {least:.3f}; "
                              f"set bitplane.mean_bits >= {least:.3f}", "bitplane.mean_bits", least) from exc
        raise
    chosen = {name: c.payload.stored(np.int64) for name, c in a.choice.items()}
    kept = sum(c.costs["weight_bits"] for c in a.choice.values())
    info = {"allocator": a.summary(), "compression": 32.0 * params / max(kept, 1.0),
            "slice2_sparsity": float(sum(wq.scheme["bitplanes"]["slice2_sparsity"] * wq.terms[0][0].size
                                         for wq in chosen.values()) / params)}
    return LayerWeights(chosen, info, a.timings())
