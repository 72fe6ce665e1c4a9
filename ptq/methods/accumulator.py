"""Accumulator-aware mixed precision: per-layer weight and input widths chosen by the allocator.

Every conv/linear must fit the recipe's P-bit accumulator (`accumulator.bits`) for any input. For
each layer and each pair (weight bits M, input activation bits N) we build a candidate: weights
clipped by output error at M bits, then made to meet the exact worst-case accumulator bound over
the input span (`ptq.accbound`: A2Q's ‖q_c‖₁·X_N + |q_b| ≤ 2^(P−1) − 1 for two-sided inputs, each
sign's mass alone for one-sided ones) by ℓ1 projection and toward-zero rounding
(`ptq.accbound.fit_budget`), with the span and the input scale taken from the encoding the pipeline
will choose at N bits. With 8-bit inputs after a ReLU (X = 255) and P = 16 that leaves Σq⁺ ≤ 128
and Σq⁻ ≤ 128 per channel, so wide layers must trade input bits for weight mass; that trade is what
the allocator decides.

Error model (ours): the expected growth of the output divergence, in one currency across layers,
    E = Σ_c F_c · ( δw_cᵀ H δw_c  +  Δ_N²/12 · ‖ŵ_c‖² )
— the weight error through the layer's input moments H, plus uniform input-quantization noise of
step Δ_N through the quantized weights — weighted by each output channel's Fisher sensitivity F_c
(`calib.sensitivity`; without it, by 1 / the layer's output energy). Costs: weight bits (params·M)
and BOPs (MACs·M·N). Budgets: `allocator.mean_weight_bits` (0: none) and `allocator.bops` as a
fraction of the 8×8-bit BOPs (0: none). Recipe pins: per-layer `allocator.weight_bits` /
`allocator.input_bits` (0: free). `allocator.mode = "naive"` is the baseline: the widest single
(M, N) for every layer whose plain rounding fits P in the worst layer, no projection.
"""
from __future__ import annotations

import numpy as np

from ..calib.observers import Encoding, choose_encoding

from ..accbound import Order, scaling_orders, mass_budgets, bits_for, exceeds, fit_budget, input_span, limit, sign_masses, worst_accumulator
from .allocator import Candidate, LayerChoices, solve_allocation
from ..errors import BudgetError, RecipeError
from ..ir import Graph, Op
from ..intmath import round_half_up
from .fields import Field, layer_setting
from .selectors import override_matches
from ..intmath import qmax
from .errormodel import Expansion, clip_search, quantize_symmetric
from .registry import register
from ..ir import LayerWeights, WeightQuant
from .base import error_weights, layer_error, per_layer

BIAS_SHARE = 0.5  # most of a P-bit accumulator the int bias may take; the weights get the rest

ALLOCATOR_SECTION = {
    "mode": Field("milp", str, ("milp", "greedy", "naive"),
                  help="milp: the integer program; greedy: its Lagrangian fallback; naive: one width pair for all layers"),
    "min_weight_bits": Field(2, int, lo=2, hi=8),
    "max_weight_bits": Field(8, int, lo=2, hi=8),
    "min_input_bits": Field(4, int, lo=2, hi=8),
    "max_input_bits": Field(8, int, lo=2, hi=8),
    "mean_weight_bits": Field(0.0, float, lo=0.0, hi=8.0, help="budget: parameter-weighted mean weight bits (0: none)"),
    "bops": Field(0.0, float, lo=0.0, hi=1.0, help="budget: bit operations as a fraction of 8×8-bit (0: none)"),
    "weight_bits": Field(0, int, lo=0, hi=8, help="per-layer pin of the weight bits (0: free)"),
    "input_bits": Field(0, int, lo=0, hi=8, help="per-layer pin of the input activation bits (0: free)"),
    "screen": Field(4, int, lo=0, hi=40,
                    help="clip ratios per channel and width evaluated exactly, the best by a low-rank estimate (0: all 40)"),
}


class LayerFit:
    """What every (M, N) candidate of one layer is fitted from, and the fit itself: shared by the
    candidate search and by `LayerFit.weights`, which rebuilds the allocator's chosen candidate
    instead of every candidate's integers being held until the solve (35 int8 copies of a 25 M-weight
    network's weights were 0.9 GB of the accumulator recipes' peak)."""

    def __init__(self, op: Op, stats, recipe: dict, input_tensor: str, producer_act, p: int):
        self.op, self.p = op, p
        c = op.weight.shape[0]
        self.w = op.weight.reshape(c, -1).astype(np.float64)
        self.err = layer_error(op, stats, ridge=recipe["weights"]["ridge"])
        self.bias = op.bias.astype(np.float64) if op.bias is not None else np.zeros(c)
        self._histogram, self._act, self._producer_act = stats.histograms[input_tensor], recipe["activations"], producer_act
        self._encodings: dict[int, Encoding] = {}
        self._expansion: Expansion | None = None  # built once, at the layer's first projected candidate
        self._order: Order | None = None  # likewise the weights' sorts, shared by every width pair's projections

    def encoding(self, n: int) -> Encoding:
        """The layer input's encoding at N bits, as the manifest builder will choose it."""
        if n not in self._encodings:
            self._encodings[n] = choose_encoding(self._histogram, n, self._act["observer"], self._act["percentile"],
                                                 self._producer_act)
        return self._encodings[n]

    def fit(self, m: int, n: int, clipped: np.ndarray):
        """The (M, N) candidate from the clipped steps at M bits: (integers, steps, bias codes, input
        span, projected, each channel's output error when the projection computed it, else None)."""
        e = self.encoding(n)
        lo, hi, p = *input_span(e.bits, e.zero_point), self.p
        # a channel whose bias alone would take more than BIAS_SHARE of the accumulator gets a coarser
        # step (its output is bias-dominated: typically a near-dead channel after BatchNorm folding)
        scale = np.maximum(clipped, np.abs(self.bias) / (e.scale * limit(p) * BIAS_SHARE)) if p < 32 else clipped
        q = quantize_symmetric(self.w, scale, m)
        bq = round_half_up(self.bias / (e.scale * scale))
        if p < 32 and np.any(exceeds(q, mass_budgets(p, lo, hi, bq))):
            self._expansion = self._expansion or Expansion(self.err, self.w)
            self._order = self._order or scaling_orders(self.w)
            q, scale, e_w = fit_with_step(self.w, scale, self.bias, e.scale, p, (lo, hi), m, self._expansion, self._order)
            return q, scale, round_half_up(self.bias / (e.scale * scale)), (lo, hi), True, e_w  # the refitted steps' bias codes
        return q, scale, bq, (lo, hi), False, None

    def weights(self, m: int, n: int, clipped: np.ndarray) -> WeightQuant:
        """The candidate's WeightQuant (int64), with its per-channel mass budgets for the rounding engine."""
        q, scale, bq, span, _, _ = self.fit(m, n, clipped)
        return WeightQuant({"scheme": "uniform", "bits": m, "narrow_range": True}, [(q.reshape(self.op.weight.shape), scale)],
                           float(m), input_bits=n, acc_budget=_budget(q, bq, self.p, span) if self.p < 32 else None)


def layer_candidates(fit: LayerFit, stats, recipe: dict, wbits: list[int], ibits: list[int]) -> list[Candidate]:
    """Every (M, N) candidate of one layer, fitted to a P-bit accumulator, with error and costs; a
    candidate's payload is (M, N, the clipped steps at M bits), from which `LayerFit.weights`
    rebuilds its integers."""
    op, w, err = fit.op, fit.w, fit.err
    params, macs = w.size, float(op.attrs.get("macs", w.size))
    weight = error_weights(op, stats, err, w)
    out = []
    for m in wbits:
        clipped = clip_search(w, m, err, recipe["allocator"]["screen"])
        plain_errors: dict[bytes, np.ndarray] = {}  # by step: input widths whose bias leaves the step alone share it
        for n in ibits:
            q, scale, bq, (lo, hi), projected, e_w = fit.fit(m, n, clipped)
            need = int(bits_for(worst_accumulator(q, lo, hi, bq).max()))
            what = q * scale[:, None]
            if not projected:
                key = scale.tobytes()
                if key not in plain_errors:
                    plain_errors[key] = err((w - what).astype(np.float32))
                e_w = plain_errors[key]
            e_a = (fit.encoding(n).scale ** 2 / 12.0) * (what ** 2).sum(1)
            error = float(np.sum(weight * (e_w + e_a)))
            out.append(Candidate({"weight_bits": m, "input_bits": n, "projected": projected}, error,
                                 {"weight_bits": float(params * m), "bops": macs * m * n}, need, (m, n, clipped)))
    return out


STEP_GROWTH = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)  # coarser steps tried for channels that must shrink


def _budget(q: np.ndarray, bias_q: np.ndarray, p: int, span: tuple[int, int]) -> np.ndarray:
    """Per channel, the most Σq⁺, Σq⁻ and Σ|q| the rounding engine may spend (`accbound.mass_budgets`):
    the P-bit bound's with the bias code of the final step, never below what the method's own
    integers spend."""
    pos, neg = sign_masses(q)
    return np.maximum(mass_budgets(p, *span, bias_q), np.stack([pos, neg, pos + neg], axis=1))


def fit_with_step(w: np.ndarray, scale: np.ndarray, bias: np.ndarray, input_scale: float, p: int,
                  span: tuple[int, int], bits: int, expansion: Expansion,
                  order: Order | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make every channel fit the P-bit bound, choosing per channel between shrinking its weights onto
    its budgets at the clipped step and a coarser step (which needs less shrinking and leaves the bias
    more room): the least output error of `STEP_GROWTH` multiples of the step wins (the first of
    equal ones). Returns the integers, the steps and each channel's output error.

    The bound is on the integers (their sign masses and the bias code), not on the step, so once q
    is fixed the step is refitted by least squares on the output error (projection shrinks every
    weight; a larger step gives the magnitude back). Only larger steps are taken: they shrink the bias code,
    so the bound still holds. Every growth is evaluated in one batch, its errors from the layer's
    `Expansion` (the projected integers are mostly zero); `order` (`accbound.scaling_orders` of w,
    growth-major like the rows stacked here) spares the projections their sorts."""
    c, k = w.shape
    s = scale[None] * np.asarray(STEP_GROWTH)[:, None]  # (S, C)
    bq = round_half_up(bias[None] / (input_scale * s))
    q = fit_budget((w[None] / s[..., None]).reshape(-1, k), mass_budgets(p, *span, bq.reshape(-1)), qmax(bits), order)
    q = q.reshape(len(STEP_GROWTH), c, k)
    s, e = expansion.refit(q, s)  # (S, C)
    best = np.argmin(e, axis=0)
    ch = np.arange(c)
    return q[best, ch], s[best, ch], e[best, ch]


def _naive(layers: list[LayerChoices], p: int) -> dict[str, Candidate]:
    """The widest single (M, N) whose plain rounding fits P in every layer (ties: least total error)."""
    pairs = sorted({(c.knobs["weight_bits"], c.knobs["input_bits"]) for c in layers[0].candidates},
                   key=lambda mn: (-(mn[0] + mn[1]), -mn[1]))
    for mn in pairs:
        picks = {}
        for lc in layers:
            cand = next(c for c in lc.candidates if (c.knobs["weight_bits"], c.knobs["input_bits"]) == mn)
            if cand.knobs["projected"] or cand.acc_bits > p:
                break
            picks[lc.layer] = cand
        else:
            return picks
    raise BudgetError(f"no single (weight bits, input bits) pair fits a {p}-bit accumulator in every layer without projection")


@register("accumulator", sections={"allocator": ALLOCATOR_SECTION}, override_keys=("allocator.weight_bits", "allocator.input_bits"),
          reads_fisher=True)
def quantize(graph: Graph, stats, recipe: dict) -> dict[str, WeightQuant]:
    al, p = recipe["allocator"], recipe["accumulator"]["bits"]
    if al["min_weight_bits"] > al["max_weight_bits"] or al["min_input_bits"] > al["max_input_bits"]:
        raise RecipeError("allocator.min_*_bits must not exceed allocator.max_*_bits")
    wbits = list(range(al["min_weight_bits"], al["max_weight_bits"] + 1))
    ibits = list(range(al["min_input_bits"], al["max_input_bits"] + 1))
    matches = override_matches(graph, recipe["overrides"])
    src, producers = graph.encoding_source(), graph.producers()

    def fitter(op: Op) -> LayerFit:
        t = src[op.inputs[0]]
        prod = producers.get(t)
        return LayerFit(op, stats, recipe, t, prod.attrs.get("act") if prod is not None else None, p)

    def choices(op: Op) -> LayerChoices:
        pin_w = layer_setting(recipe, "allocator.weight_bits", op.name, matches)
        pin_i = layer_setting(recipe, "allocator.input_bits", op.name, matches)
        cands = layer_candidates(fitter(op), stats, recipe, [pin_w] if pin_w else wbits, [pin_i] if pin_i else ibits)
        return LayerChoices(op.name, src[op.inputs[0]], cands)

    def chosen(choice: dict[str, Candidate]) -> dict[str, WeightQuant]:
        """Each layer's chosen candidate, rebuilt from its payload (the bits the search measured)."""
        ops = [op for op in graph.weighted_ops() if op.name in choice]
        rebuilt = per_layer(lambda op: fitter(op).weights(*choice[op.name].payload), ops, stats, "chosen candidates (layers)")
        return dict(zip((op.name for op in ops), rebuilt))

    layers = per_layer(choices, graph.weighted_ops(), stats, "accumulator candidates, every width pair (layers)")
    if al["mode"] == "naive":
        choice = _naive(layers, p)
        pair = next(iter(choice.values())).knobs
        return LayerWeights(chosen(choice), {"allocator": "naive", "weight_bits": pair["weight_bits"], "input_bits": pair["input_bits"]})
    params = sum(float(op.weight.size) for op in graph.weighted_ops())
    budgets = {}
    if al["mean_weight_bits"] > 0:
        budgets["weight_bits"] = al["mean_weight_bits"] * params
    if al["bops"] > 0:
        budgets["bops"] = al["bops"] * sum(64.0 * float(op.attrs.get("macs", op.weight.size)) for op in graph.weighted_ops())
    try:
        a = solve_allocation(layers, budgets, p, "greedy" if al["mode"] == "greedy" else "auto")
    except BudgetError as exc:
        if exc.key == "weight_bits":
            least = exc.least / params
            raise BudgetError(f"allocator.mean_weight_bits = {al['mean_weight_bits']:g} cannot be met with {p}-bit accumulators "
                              f"and the recipe's pins: the least is {least:.3f}; set allocator.mean_weight_bits >= {least:.3f}",
                              "allocator.mean_weight_bits", least) from exc
        if exc.key == "bops":
            least = exc.least / (budgets["bops"] / al["bops"])
            raise BudgetError(f"allocator.bops = {al['bops']:g} cannot be met: the least is {least:.4f} of the 8x8-bit BOPs; "
                              f"set allocator.bops >= {least:.4f}", "allocator.bops", least) from exc
        raise
    return LayerWeights(chosen(a.choice), {"allocator": a.summary()}, a.timings())
