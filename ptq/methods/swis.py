"""SWIS: shared weight bit sparsity (Li, Romaszkan, Graening, Gupta, 2021).

Every output channel's weights are b₀-bit sign-magnitude integers on a per-channel scale (the
output-error clipping search at b₀ bits). Groups of G consecutive weights along K each keep only N
of the b₀−1 magnitude bit positions (any N, not necessarily consecutive): a weight is stored as a
sign and an N-bit mask over its group's set S, q = sign · Σ_{k∈S} m_k·2^k, and executes as an
ordinary b₀-bit integer weight. On a bit-serial array a group then costs one cycle per position it
uses instead of b₀ (`ptq.bitserial`).

Search (exhaustive, vectorised): for every one of the C(b₀−1, N) sets, a table maps a weight's real
magnitude |w/s| (by its half-unit cell ⌊2|w/s|⌋, which decides the nearest representable integer
exactly) to the nearest magnitude the set can represent; each group's error under every set is one
gather and one weighted sum, Σ_k h_k (|x_k| − T_S[x_k])², with h = diag(H) of the layer's input
moments (plain squared error without H), and the set with the least error wins. Groups are
processed in chunks so memory stays bounded (the 1280×1000 classifier of EfficientNet-Lite0 needs
a few MB at a time). Mapping the real value, not the b₀-bit rounded integer, avoids rounding twice.

Scale (ours, measured in BENCHMARKS/the swis brief): the b₀-bit clipping scale is a poor fit for a
group that can only keep N positions, so `scale_grid` > 0 re-searches each channel's scale over
ratios of max|w|/qmax with the full output error (w − ŵ)ᵀH(w − ŵ) of the SWIS result.

`positions = "truncate"` is the baseline the paper beats: every group keeps the N most significant
positions (a fixed consecutive set), mapped to nearest like the search.

N per layer: `mode = "fixed"` uses `shared_bits` everywhere (per-layer overrides allowed);
`mode = "allocate"` (the shipped recipes) measures every N in [min_shared_bits, max_shared_bits] per
layer and lets the shared allocator (`ptq.methods.allocator`) choose under budgets on total cycles (a fraction
of the b₀-cycle bit-serial baseline) and mean storage bits; a budget left at 0 is that of N =
shared_bits in every layer, so `swis` (N = 3) spends no more cycles or bits than N = 3 everywhere,
only where the output error is (BENCHMARKS.md, SWIS: allocated N against N = 3 in every layer at the
same cycles and storage). A budget set on a fixed-mode recipe (which is what
`ptq sweep` does through the recipe's budget_key) allocates too: the budget, not N, then decides. Error currency as in the accumulator method:
Σ_c F_c·e_c with the Fisher sensitivity F_c, or Σ_c e_c / layer output energy without it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import bitserial
from ..bitserial import nearest_tables
from .allocator import Candidate, LayerChoices, solve_allocation
from ..errors import BudgetError, RecipeError
from ..ir import Graph, Op
from .fields import Field, layer_setting
from .selectors import override_matches
from ..intmath import qmax
from .errormodel import ErrorModel, clip_search, fixed_order, unseen_groups
from .registry import register
from ..ir import LayerWeights, WeightQuant
from .base import error_weights, layer_error, per_layer

CHUNK = 1 << 18  # sets × groups × G table values gathered at once (float32: 1 MB, in cache: 3× faster than 16 MB)

SWIS_SECTION = {
    "bits": Field(8, int, lo=3, hi=8, help="b₀: bits of the sign-magnitude integers the groups are cut from"),
    "group": Field(8, int, lo=1, hi=4096, help="G: consecutive weights along K sharing one set of bit positions"),
    "shared_bits": Field(3, int, lo=1, hi=8, help="N: magnitude bit positions each group keeps (< swis.bits)"),
    "lanes": Field(16, int, lo=1, hi=1 << 16, help="lock-stepped lanes of the bit-serial array (cycle model)"),
    "positions": Field("search", str, ("search", "truncate"),
                       help="search: best N-position set per group; truncate: the N most significant (baseline)"),
    "scale_grid": Field(6, int, lo=0, hi=64,
                        help="coarse clip ratios re-searched per channel with the SWIS output error, then a finer "
                             "grid and least-squares refits (0: the b₀-bit output-error clipping scale as is)"),
    "feedback": Field(False, bool, help="after the scale search, decide groups left to right along K with "
                                         "GPTQ-style error feedback through H (kept per channel where it lowers the error)"),
    "objective": Field("output", str, ("output", "mse"),
                       help="errors weighted by the layer's input moments H (diag for the set search) or plain MSE"),
    "mode": Field("fixed", str, ("fixed", "allocate"),
                  help="fixed: N = shared_bits per layer (unless a budget is set); allocate: N per layer chosen by "
                       "the allocator under the budgets"),
    "min_shared_bits": Field(1, int, lo=1, hi=8, help="allocate: least N a layer may get"),
    "max_shared_bits": Field(7, int, lo=1, hi=8, help="allocate: most N a layer may get (capped at swis.bits − 1)"),
    "cycles": Field(0.0, float, lo=0.0, hi=1.0,
                    help="allocate: budget on total bit-serial cycles as a fraction of the b₀-cycle baseline "
                         "(0: N/b₀, the cost of N = shared_bits everywhere without skipping)"),
    "mean_weight_bits": Field(0.0, float, lo=0.0, hi=16.0,
                              help="allocate: budget on parameter-weighted mean storage bits "
                                   "(0: 1 + N + N·⌈log2(b₀−1)⌉/G, the storage of N = shared_bits everywhere)"),
}


# ---------------------------------------------------------------- the position-set search

def position_sets(magnitude_bits: int, n: int, truncate: bool = False) -> np.ndarray:
    """Bitmasks of every N-subset of the magnitude positions (or only the N most significant)."""
    if truncate:
        return np.array([sum(1 << k for k in range(magnitude_bits - n, magnitude_bits))], np.int64)
    return np.array([sum(1 << k for k in c) for c in itertools.combinations(range(magnitude_bits), n)], np.int64)


def best_sets(x: np.ndarray, h: np.ndarray, tables: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best set per group and the mapped magnitudes, for magnitudes x (M, G) ≥ 0 weighted by h (M, G).

    Exhaustive over the S sets: gather every set's values, weighted squared error, argmin (the first
    set on ties); chunked over groups so at most CHUNK values are gathered at once. The table is
    held by cell, so one gather copies a weight's S values as one row, and the error is formed in
    that buffer: half the time of gathering set by set (the search is most of SWIS's method time).
    """
    s, t_len = tables.shape
    m, g = x.shape
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    ht = torch.from_numpy(np.ascontiguousarray(h, np.float32))
    cell = torch.clamp((2 * xt).long(), 0, t_len - 1)  # x ≥ 0: truncation is the floor
    by_cell = torch.from_numpy(np.ascontiguousarray(tables.T, np.float32))  # (T, S): a cell's S values in one row
    if s == 1:  # one set (truncation, or N = b₀ − 1): nothing to choose
        return np.zeros(m, np.int64), tables[0][cell.numpy()]
    best = torch.empty(m, dtype=torch.long)
    step = max(1, CHUNK // max(s * g, 1))
    with torch.no_grad(), fixed_order():
        for lo in range(0, m, step):
            hi = min(m, lo + step)
            v = by_cell.index_select(0, cell[lo:hi].reshape(-1)).view(hi - lo, g, s)  # (m, G, S)
            v.sub_(xt[lo:hi, :, None]).square_().mul_(ht[lo:hi, :, None])  # in place: one buffer, no temporaries
            best[lo:hi] = v.sum(1).argmin(1)
    idx = best.numpy()
    mags = tables[idx[:, None], cell.numpy()]  # (M, G)
    return idx, mags


# ---------------------------------------------------------------- one layer at one N

@dataclass
class SwisLayer:
    """One layer decomposed at one N: integer weights, scales, group sets, errors and schedule."""

    q: np.ndarray  # (C, K) int8: sign · representable magnitude
    scale: np.ndarray  # (C,)
    shifts: np.ndarray  # (C, ngroups) bitmask of each group's set
    errors: np.ndarray  # (C,) output error (w − ŵ)ᵀH(w − ŵ), or squared error without H
    shared_bits: int
    schedule: dict[str, Any]
    order: np.ndarray  # issue order of the C·ngroups groups


def _input_weights(op: Op, stats, c: int, k: int, objective: str) -> np.ndarray:
    """(C, K) per-input weights of the set search: diag(H) of the channel's conv group, or ones."""
    li = stats.layer_inputs.get(op.name) if stats is not None and objective == "output" else None
    if li is None:
        return np.ones((c, k), np.float32)
    h = li.hessian
    d = np.where(unseen_groups(h)[:, None], 1.0, np.diagonal(h, axis1=1, axis2=2))  # (groups, K); a group never seen: each weight alike
    return np.repeat(d, c // d.shape[0], axis=0).astype(np.float32)


def in_groups(a: np.ndarray, group: int) -> np.ndarray:
    """(C, K) → (C·⌈K/G⌉, G): each row's groups of G along K, the last one padded with zeros."""
    return np.pad(a, ((0, 0), (0, (-a.shape[1]) % group))).reshape(-1, group)


def _grouped(w: np.ndarray, scale: np.ndarray, m: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(w/scale clipped to ±m (C, K), its magnitudes in groups of G (`in_groups`))."""
    x = np.clip(w / scale[:, None], -m, m)
    return x, in_groups(np.abs(x), group)


def _decompose(grouped: tuple[np.ndarray, np.ndarray], hg: np.ndarray, tables: np.ndarray,
               masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer weights (C, K) and group set masks (C, ngroups) of `_grouped`'s weights on their scale,
    the sets searched with the input weights hg in the same groups."""
    x, mag = grouped
    c, k = x.shape
    idx, mags = best_sets(mag, hg, tables)
    q = (np.sign(x) * mags.reshape(c, -1)[:, :k]).astype(np.int64)
    return q, masks[idx].reshape(c, -1)


DAMP = 0.01  # error feedback: H + DAMP·mean(diag H)·I, as in GPTQ


def feedback_decompose(w: np.ndarray, scale: np.ndarray, hessian: np.ndarray, tables: np.ndarray,
                       masks: np.ndarray, m: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer weights and group sets with error feedback along K (GPTQ/OBS, ours for SWIS).

    Groups are decided left to right, one column of groups at a time for every channel at once:
    the column's sets are searched on the weights as updated so far, with per-input weights
    1/[U]_jj² (U the upper Cholesky factor of H⁻¹: the error a rounding leaves after the later inputs
    compensate it), then each of its G inputs is mapped to the nearest value of its set and its
    error is pushed onto the inputs not yet decided. The loop runs over the K inputs of a layer;
    each step is vectorised over all channels (and over the blocks of a grouped or depthwise conv).
    """
    c, k = w.shape
    g = hessian.shape[0]
    h = torch.from_numpy(np.array(hessian, np.float64))
    x = torch.from_numpy(w / scale[:, None]).reshape(g, c // g, k).clone()
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag <= 0  # an input never seen on calibration data keeps its weight and takes no feedback: other data sees it
    h = h + torch.diag_embed(dead.double() + DAMP * diag.mean(1, keepdim=True).clamp_min(1e-12).expand_as(diag))
    with fixed_order():
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (g, K, K)
    ud = torch.diagonal(u, dim1=1, dim2=2)  # (g, K)
    tab = torch.from_numpy(tables)
    q = torch.zeros_like(x)
    ng = -(-k // group)
    shifts = np.zeros((c, ng), np.int64)
    for b in range(ng):
        lo, hi = b * group, min(k, (b + 1) * group)
        blk = x[:, :, lo:hi].clamp(-m, m).abs().reshape(c, -1)
        wts = (1.0 / ud[:, lo:hi] ** 2)[:, None, :].expand(g, c // g, hi - lo).reshape(c, -1)
        idx, _ = best_sets(in_groups(blk.numpy(), group), in_groups(wts.numpy(), group), tables)
        shifts[:, b] = masks[idx]
        sel = tab[torch.from_numpy(idx)].reshape(g, c // g, -1)  # (g, C/g, T): each channel's table
        for j in range(lo, hi):
            xj = x[:, :, j].clamp(-m, m)
            cell = (2 * xj.abs()).long().clamp(0, tab.shape[1] - 1)
            qj = torch.sign(xj) * torch.gather(sel, 2, cell[..., None])[..., 0].double()
            q[:, :, j] = qj
            e = (x[:, :, j] - qj) / ud[:, None, j]
            x[:, :, j + 1:] -= e[..., None] * u[:, None, j, j + 1:]
    return q.reshape(c, k).numpy().astype(np.int64), shifts


SCALE_SPAN = 4.0  # the re-searched scales span this factor below the no-clipping scale
REFITS = 2  # least-squares scale refits after the grid


def scale_ratios(bits: int, shared_bits: int, truncate: bool, n: int) -> np.ndarray:
    """Ratios r of max|w|/qmax tried as scales: geometric from u/SCALE_SPAN to u.

    u = qmax / (largest magnitude any set represents: the N most significant positions), so that
    at r = u a channel's largest weight is representable without clipping. Scaling by 2 shifts
    every position by one, so one octave already reaches every relative placement of the sets;
    the second octave allows the heavier clipping that output error prefers on heavy-tailed layers.
    """
    if n <= 0:
        return np.zeros(0)
    m = qmax(bits)
    top = int(position_sets(bits - 1, shared_bits, True)[0])
    u = m / top
    return np.geomspace(u / SCALE_SPAN, u, n)


class _Best:
    """Per channel, the decomposition with the least output error among the scales offered so far.

    At each scale the all-truncation decomposition (every group on the N most significant positions,
    the largest mask) is offered too: the set search weighs inputs by diag(H) alone, and where the
    inputs are strongly correlated (after a ReLU) its sets can have a larger full output error than
    truncation's, which it contains; the full error, not the proxy, then decides per channel."""

    def __init__(self, c: int):
        self.e = np.full(c, np.inf)
        self.q = self.s = self.shifts = None

    def offer(self, w: np.ndarray, s: np.ndarray, err: ErrorModel, hg: np.ndarray, tables: np.ndarray,
              masks: np.ndarray, m: int, group: int) -> None:
        grouped = _grouped(w, s, m, group)  # shared by the search and the truncation
        q, shifts = _decompose(grouped, hg, tables, masks)
        self.consider(w, q, s, shifts, err)
        if len(masks) > 1:
            top = [int(np.argmax(masks))]
            q, shifts = _decompose(grouped, hg, tables[top], masks[top])
            self.consider(w, q, s, shifts, err)

    def consider(self, w: np.ndarray, q: np.ndarray, s: np.ndarray, shifts: np.ndarray, err: ErrorModel) -> None:
        e = err((w - q * s[:, None]).astype(np.float32))
        if self.q is None:
            self.q, self.s, self.shifts, self.e = q, s.copy(), shifts, e
            return
        better = e < self.e
        self.q = np.where(better[:, None], q, self.q)
        self.s = np.where(better, s, self.s)
        self.shifts = np.where(better[:, None], shifts, self.shifts)
        self.e = np.where(better, e, self.e)

    def refit(self, w: np.ndarray, err: ErrorModel, hg: np.ndarray, tables: np.ndarray, masks: np.ndarray,
              m: int, group: int, decompose: bool = True) -> None:
        """Least-squares scale for the current integers, (wᵀHq)/(qᵀHq) (kept where it is positive and
        lowers the error, which it does unless rounding says otherwise), then decompose again there."""
        ls = err.refit_scale(w, self.q, self.s)
        s = np.where(ls > 0, ls, self.s)
        e = err((w - self.q * s[:, None]).astype(np.float32))
        better = e < self.e
        self.s = np.where(better, s, self.s)
        self.e = np.where(better, e, self.e)
        if decompose:
            self.offer(w, self.s.copy(), err, hg, tables, masks, m, group)


def swis_layer(op: Op, stats, bits: int, group: int, shared_bits: int, lanes: int, truncate: bool,
               scale_grid: int, objective: str, base: np.ndarray | None = None, feedback: bool = False,
               ridge: float = 0.0) -> SwisLayer:
    """Decompose one conv/linear layer (see the module docstring); `base`: its b₀-bit clipping scale if
    known; `ridge`: the recipe's `weights.ridge`."""
    c, k = op.weight_matrix_shape
    w = op.weight.reshape(c, k).astype(np.float64)
    m = qmax(bits)
    err: ErrorModel = layer_error(op, stats, output_error=objective == "output", ridge=ridge)
    masks = position_sets(bits - 1, shared_bits, truncate)
    tables = nearest_tables(masks, bits - 1)
    hg = in_groups(_input_weights(op, stats, c, k, objective), group)
    amax = np.abs(w).max(1)
    amax = np.where(amax > 0, amax, 1.0)
    best = _Best(c)
    ratios = scale_ratios(bits, shared_bits, truncate, scale_grid)
    if len(ratios) == 0:  # the b₀-bit output-error clipping scale, as is
        best.offer(w, clip_search(w, bits, err) if base is None else base, err, hg, tables, masks, m, group)
    for r in ratios:  # coarse: the same ratios for every channel
        best.offer(w, amax * r / m, err, hg, tables, masks, m, group)
    if len(ratios) > 1:  # fine: between the coarse neighbours of each channel's best
        step = ratios[1] / ratios[0]
        centre = best.s.copy()
        for f in np.geomspace(1 / step, step, scale_grid // 2 + 3)[1:-1]:
            best.offer(w, centre * f, err, hg, tables, masks, m, group)
        for _ in range(REFITS):
            best.refit(w, err, hg, tables, masks, m, group)
    li = stats.layer_inputs.get(op.name) if stats is not None and objective == "output" else None
    if feedback and li is not None:  # error feedback at each channel's best scale; kept where it helps
        q, shifts = feedback_decompose(w, best.s, li.hessian, tables, masks, m, group)
        best.consider(w, q, best.s.copy(), shifts, err)
        best.refit(w, err, hg, tables, masks, m, group, decompose=False)
    best_q, best_s, best_shift, best_e = best.q, best.s, best.shifts, best.e
    positions = max(1, int(op.attrs.get("macs", c * k)) // (c * k))
    summary, order = bitserial.layer_schedule(best_q, group, lanes, shared_bits, bits, positions)
    return SwisLayer(best_q.astype(np.int8), best_s, best_shift, best_e, shared_bits, summary, order)


def build(layer: SwisLayer, op: Op, bits: int, group: int, positions: str) -> WeightQuant:
    """The layer's WeightQuant: one integer term, the scheme's scalar fields and its extra tensors."""
    scheme = {"scheme": "swis", "bits": bits, "group": group, "shared_bits": layer.shared_bits,
              "narrow_range": True, "positions": positions, **layer.schedule}
    extra = {"shifts": layer.shifts.astype(np.int32), "order": layer.order.astype(np.int32)}
    q = layer.q.astype(np.int64).reshape(op.weight.shape)
    return WeightQuant(scheme, [(q, layer.scale)], bitserial.storage_bits(bits, layer.shared_bits, group), extra)


# ---------------------------------------------------------------- the method

def _check_n(n: int, bits: int, key: str, layer: str) -> None:
    if n >= bits:
        raise RecipeError(f"swis.{key} = {n} for layer {layer} must be below swis.bits = {bits} "
                          f"(a group keeps N of the {bits - 1} magnitude positions)")


@register("swis", sections={"swis": SWIS_SECTION}, override_keys=("swis.shared_bits", "swis.min_shared_bits", "swis.max_shared_bits"),
          reads_fisher=True)
def quantize(graph: Graph, stats, recipe: dict) -> dict[str, WeightQuant]:
    sw = recipe["swis"]
    bits, group, lanes = sw["bits"], sw["group"], sw["lanes"]
    truncate = sw["positions"] == "truncate"
    matches = override_matches(graph, recipe["overrides"])
    ops = graph.weighted_ops()

    def run(op: Op, n: int, base: np.ndarray | None = None) -> SwisLayer:
        return swis_layer(op, stats, bits, group, n, lanes, truncate, sw["scale_grid"], sw["objective"], base,
                          sw["feedback"], recipe["weights"]["ridge"])

    budgeted = sw["cycles"] > 0 or sw["mean_weight_bits"] > 0
    if sw["mode"] == "fixed" and not budgeted:
        shared = {op.name: layer_setting(recipe, "swis.shared_bits", op.name, matches) for op in ops}
        for op in ops:
            _check_n(shared[op.name], bits, "shared_bits", op.name)
        lays = per_layer(lambda op: run(op, shared[op.name]), ops, description="SWIS set search (layers)")
        out = {op.name: build(lay, op, bits, group, sw["positions"]) for op, lay in zip(ops, lays)}
        cycles = {op.name: lay.schedule for op, lay in zip(ops, lays)}
        return LayerWeights(out, {"swis": {"mode": "fixed", **bitserial.totals(cycles)}})

    n_ref = sw["shared_bits"]  # the N whose everywhere-cost sets the budgets left at 0
    if n_ref >= bits:
        raise RecipeError(f"swis.shared_bits = {n_ref} must be below swis.bits = {bits} (it sets the default budgets)")
    spans = {}
    for op in ops:
        lo = layer_setting(recipe, "swis.min_shared_bits", op.name, matches)
        hi = min(layer_setting(recipe, "swis.max_shared_bits", op.name, matches), bits - 1)
        _check_n(lo, bits, "min_shared_bits", op.name)
        if lo > hi:
            raise RecipeError(f"swis.min_shared_bits = {lo} exceeds swis.max_shared_bits = {hi} for layer {op.name}")
        spans[op.name] = lo, hi

    def choices(op: Op) -> LayerChoices:
        lo, hi = spans[op.name]
        c, k = op.weight_matrix_shape
        w = op.weight.reshape(c, k).astype(np.float32)
        err = layer_error(op, stats, output_error=sw["objective"] == "output", ridge=recipe["weights"]["ridge"])
        weight = error_weights(op, stats, err, w)
        base = None if sw["scale_grid"] else clip_search(w.astype(np.float64), bits, err)
        cands = []
        for n in range(lo, hi + 1):
            lay = run(op, n, base)
            cost = {"cycles": float(lay.schedule["cycles"]),
                    "weight_bits": float(c * k * bitserial.storage_bits(bits, n, group))}
            cands.append(Candidate({"shared_bits": n}, float(np.sum(weight * lay.errors)), cost, 0, (lay, op)))
        return LayerChoices(op.name, None, cands)

    layers = per_layer(choices, ops, description="SWIS set search, every N (layers)")
    budgets = {}
    params = sum(float(op.weight.size) for op in ops)
    base_cycles = sum(float(lc.candidates[0].payload[0].schedule["baseline_cycles"]) for lc in layers)
    cyc = sw["cycles"] or n_ref / bits
    mwb = sw["mean_weight_bits"] or bitserial.storage_bits(bits, n_ref, group)
    budgets["cycles"], budgets["weight_bits"] = cyc * base_cycles, mwb * params

    try:
        a = solve_allocation(layers, budgets)
    except BudgetError as exc:
        if exc.key == "cycles":
            least = exc.least / base_cycles
            given = f"{cyc:g}" + ("" if sw["cycles"] else f" (from swis.shared_bits = {n_ref})")
            raise BudgetError(f"swis.cycles = {given} cannot be met with the recipe's pins: the least is {least:.4f} of the "
                              f"baseline cycles; set swis.cycles >= {least:.4f}", "swis.cycles", least) from exc
        if exc.key == "weight_bits":
            least = exc.least / params
            given = f"{mwb:g}" + ("" if sw["mean_weight_bits"] else f" (from swis.shared_bits = {n_ref})")
            raise BudgetError(f"swis.mean_weight_bits = {given} cannot be met with the recipe's pins: the least is {least:.3f}; "
                              f"set swis.mean_weight_bits >= {least:.3f}", "swis.mean_weight_bits", least) from exc
        raise
    out, cycles = {}, {}
    for name, cand in a.choice.items():
        lay, op = cand.payload
        out[name] = build(lay, op, bits, group, sw["positions"])
        cycles[name] = lay.schedule
    info = {"swis": {"mode": "allocate", **bitserial.totals(cycles),
                     "shared_bits": {k: c.knobs["shared_bits"] for k, c in a.choice.items()}},
            "allocator": a.summary()}
    return LayerWeights(out, info, a.timings())
