"""Multipoint: each output channel as a sum of low-bit vectors (Liu et al., AAAI 2021).

    ŵ_c = Σ_i a_ci · v_ci,   v_ci on the symmetric narrow grid of point i, a_ci > 0.

Greedy construction per channel (vectorised over channels and the coefficient grid): residual
r₀ = w; for each point search a on a 1-D grid, v = clip(round(r/a)), keep the a with the least
output error (w − ŵ)ᵀH(w − ŵ) (weight MSE without H), r ← r − a·v. Every channel's whole greedy
sequence up to `max_points` is computed once, so allocation is pure bookkeeping on error tables.

Two additions of ours. `coefficients = "refit"`: once a channel's integer vectors are fixed, its
coefficients are refitted jointly by least squares on the output error, for every number of points
it may keep (the greedy a_i was fitted to a residual before the later points existed).
`extra_bits`: points after the first may sit on a narrower grid (e.g. 4-bit first point, 2-bit
corrections), which makes an extra point cheaper and the bit budget finer-grained; a point costs
its bits over the first point's bits of the budget.

Allocation: every channel starts with one point; the point with the largest priority is added next
until the channel's relative error e/wᵀHw ≤ ε or the budget is spent. `priority = "energy"` (the
field's default, closest to the paper's "worst channel first"): the channel's output error divided by
its layer's output energy Σ_c wᵀHw. `priority = "fisher"` (ours, what the shipped recipes use) ranks
by the expected loss the point saves, F_c · (e_n − e_{n+1}), per weight it costs, with F_c the
channel's Fisher sensitivity (`calib.sensitivity`). Fisher measures better on EfficientNet-Lite0,
energy on the digits CNN, whose Fisher is tiny and noisy (BENCHMARKS.md, multipoint). Either is multiplied by a per-layer
`sensitivity` (1 unless a recipe override says otherwise).
The budget is in units of a first point per weight, parameter-weighted and global across the
network by default (effective bits = bits × budget), or per layer (`budget_scope = "layer"`).
Priorities are kept non-increasing along a channel's points, so the greedy order equals one global
sort of all candidate increments and the budget is a prefix of it: no Python loop over channels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import RecipeError
from ..ir import Graph
from .fields import Field, layer_setting
from .selectors import override_matches
from ..intmath import qmax
from .errormodel import ErrorModel, least_error
from .registry import register
from ..ir import WeightQuant
from .base import layer_error, per_layer

GRID = 100  # coefficient candidates per point
GRID_LO = 0.05  # smallest candidate, as a fraction of max|r| / qmax
CHUNK = 1 << 22  # grid values × weights evaluated at once (float32 elements)

MULTIPOINT_SECTION = {
    "bits": Field(4, int, lo=2, hi=8, help="bits of a channel's first point (symmetric narrow grid)"),
    "extra_bits": Field(0, int, lo=0, hi=8, help="bits of every further point (0: the same as `bits`); a point of "
                        "extra_bits costs extra_bits / bits of the budget"),
    "coefficients": Field("refit", str, ("greedy", "refit"),
                          help="keep the greedy coefficients, or refit a channel's coefficients jointly by least "
                               "squares on the output error once its points are fixed"),
    "epsilon": Field(1e-4, float, lo=0.0, hi=1.0,
                     help="a channel whose relative output error e/wᵀHw is at most this gets no more points"),
    "budget": Field(1.25, float, lo=1.0, hi=16.0,
                    help="mean bits per weight over `bits` (parameter-weighted): effective bits = bits × budget; "
                         "with extra_bits = bits, the mean points per channel"),
    "budget_scope": Field("global", str, ("global", "layer"),
                          help="spend the budget across the whole network or within each layer"),
    "channel_choice": Field("error", str, ("error", "random"),
                            help="which channels get extra points: largest error, or at random (ablation)"),
    "priority": Field("energy", str, ("energy", "fisher"),
                      help="rank extra points by Fisher-weighted output-error reduction per weight, or by "
                           "error relative to the layer's output energy"),
    "max_points": Field(4, int, lo=1, hi=16, help="most points a channel can have"),
    "screen": Field(4, int, lo=0, hi=1000,
                    help="coefficient candidates per channel and search round whose output error is computed in "
                         "full, the best by an estimate exact on H's 16 leading directions (0: every candidate in full)"),
    "objective": Field("output", str, ("output", "mse"), help="coefficient search by output error (H) or weight MSE"),
    "sensitivity": Field(1.0, float, lo=0.0, hi=1e6, help="per-layer weight of its errors in the global ranking"),
    "seed": Field(0, int, lo=0, hi=2**31 - 1, help="seed of the random channel choice"),
}


@dataclass
class Points:
    """A layer's greedy sequence: point i of channel c is q[i, c] on a bits[i] grid, with greedy
    coefficient scales[i, c]; a channel that keeps n points uses the coefficients coef[n − 1, :n, c]
    (the greedy ones, or refitted jointly) and has output error errors[n − 1, c]."""

    q: np.ndarray  # (P, C, K) int8 (a point has at most 8 bits)
    scales: np.ndarray  # (P, C) float64, positive
    errors: np.ndarray  # (P, C): output error with 1..P points
    energy: np.ndarray  # (C,): wᵀHw (or ‖w‖²)
    bits: np.ndarray  # (P,) bits of each point
    coef: np.ndarray  # (P, P, C) coefficients by number of points kept


def _errors(err: ErrorModel, d: np.ndarray) -> np.ndarray:
    return err(np.ascontiguousarray(d, dtype=np.float32))


def _search(r: np.ndarray, ratios: np.ndarray, base: np.ndarray, m: int, err: ErrorModel,
            best_e: np.ndarray, best_a: np.ndarray, keep: int | None = None) -> None:
    """Try a = ratios[t, c] · base[c] (ratios (T, C) or (T,)); keep the best a per channel in place,
    each channel's `keep` best by the screen (`least_error`) evaluated exactly."""
    c = r.shape[0]
    a = (np.broadcast_to(ratios.reshape(len(ratios), -1), (len(ratios), c)) * base[None, :]).astype(np.float32)
    r32 = r.astype(np.float32)

    def residual(s: np.ndarray) -> np.ndarray:
        return r32[None] - s[..., None] * np.clip(np.floor(r32[None] / s[..., None] + 0.5), -m, m)

    i, e_min = least_error(err, residual, a, keep, CHUNK)
    better = e_min < best_e
    best_e[better] = e_min[better]
    best_a[better] = a[i, np.arange(c)][better]


def greedy_points(w: np.ndarray, bits: int, points: int, err: ErrorModel,
                  grid: np.ndarray | None = None, extra_bits: int = 0, screen: int = 0) -> Points:
    """The greedy multipoint sequence of every channel of a (C, K) weight, `points` deep; the first
    point on the `bits` grid, the others on the `extra_bits` grid (0: the same).

    The coefficient of each point is searched on ratios of max|r|/qmax: the explicit `grid` if
    given, else (ours) a geometric grid of 100 values over [0.05, 1] searched coarse to fine — 25
    values, then 16 around each channel's best (BENCHMARKS.md, multipoint: as fine as the full grid, cheaper).
    With `screen`, each round evaluates in full only each channel's `screen` best candidates by the
    estimate of `ErrorModel.screen` (`least_error`).
    """
    point_bits = np.array([bits] + [extra_bits or bits] * (points - 1))
    keep = screen or None
    c, k = w.shape
    w = w.astype(np.float64)
    r = w.copy()
    qs = np.zeros((points, c, k), np.int8)
    scales = np.zeros((points, c))
    errors = np.zeros((points, c))
    cur = _errors(err, r)
    energy = cur.copy()
    fallback = np.abs(w).max(1) / qmax(bits)
    fallback = np.where(fallback > 0, fallback, 1.0)
    coarse = np.geomspace(GRID_LO, 1.0, GRID // 4)
    spread = coarse[1] / coarse[0]
    for p in range(points):
        m = qmax(int(point_bits[p]))
        amax = np.abs(r).max(1)
        base = np.where(amax > 0, amax / m, fallback)
        best_e = np.full(c, np.inf)
        best_a = base.copy()
        if grid is not None:
            _search(r, np.asarray(grid, np.float64), base, m, err, best_e, best_a, keep)
        else:
            _search(r, coarse, base, m, err, best_e, best_a, keep)
            fine = np.geomspace(1 / spread, spread, 16)[:, None] * (best_a / base)[None, :]
            _search(r, np.minimum(fine, 1.0), base, m, err, best_e, best_a, keep)
        v = np.clip(np.floor(r / best_a[:, None] + 0.5), -m, m)
        e = _errors(err, r - best_a[:, None] * v)
        worse = e >= cur  # a point must not make a channel worse: leave it at zero
        v[worse] = 0
        e = np.where(worse, cur, e)
        qs[p] = v.astype(np.int8)
        scales[p] = best_a
        errors[p] = e
        r = r - best_a[:, None] * v
        cur = e
        fallback = best_a
    coef = np.broadcast_to(scales[None], (points, points, c)).copy()
    return Points(qs, scales, errors, energy, point_bits, coef)


def refit_coefficients(w: np.ndarray, pts: Points, err: ErrorModel) -> Points:
    """(ours) For every channel and every number n of points kept, the coefficients a minimising
    the output error of Σ a_i v_i with the greedy integer vectors fixed: (V H Vᵀ) a = V H w. The
    paper keeps the greedy a_i, each fitted to a residual before the later points existed. Where
    the solution is not positive (the manifest's coefficients are scales) or not better, the greedy
    coefficients stay."""
    p, c, _ = pts.q.shape
    w = w.astype(np.float64)
    v = pts.q.astype(np.float64)
    hv = err.hmul(v).double().numpy()  # (P, C, K)
    gram = np.einsum("ick,jck->cij", v, hv)
    rhs = np.einsum("ick,ck->ci", hv, w)
    coef, errors = pts.coef.copy(), pts.errors.copy()
    live = np.einsum("cii->ci", gram) > 0  # a point left at zero keeps its (unused) greedy coefficient
    for n in range(1, p + 1):
        on = live[:, :n]
        g = gram[:, :n, :n] * (on[:, :, None] & on[:, None, :]) + np.eye(n) * ~on[:, None, :]
        a = np.einsum("cij,cj->ci", np.linalg.pinv(g), rhs[:, :n] * on)
        a = np.where(on, a, pts.scales[:n].T)
        ok = np.all(a > 0, axis=1) & np.all(np.isfinite(a), axis=1)
        a = np.where(ok[:, None], a, pts.scales[:n].T)
        e = err(w - np.einsum("ci,ick->ck", a, v[:n]))
        better = ok & (e < errors[n - 1])
        coef[n - 1, :n] = np.where(better[None], a.T, coef[n - 1, :n])
        errors[n - 1] = np.where(better, e, errors[n - 1])
    return replace(pts, coef=coef, errors=errors)


@dataclass
class LayerPlan:
    name: str
    pts: Points
    bits: int
    max_points: int
    sensitivity: float
    k: int  # weights per channel: the cost of a channel's first point
    fisher: np.ndarray | None  # (C,) Fisher sensitivity of each output channel, or None


def allocate_points(plans: list[LayerPlan], budget: float, scope: str, choice: str, epsilon: float,
             seed: int) -> dict[str, np.ndarray]:
    """Points per channel of every layer (ints ≥ 1) under the budget (see the module docstring)."""
    groups = [plans] if scope == "global" else [[p] for p in plans]
    rng = np.random.default_rng(seed)
    out = {}
    for group in groups:
        keys, costs, owner, chan, order = [], [], [], [], []
        total = 0.0
        for li, p in enumerate(group):
            c = p.pts.errors.shape[1]
            total += budget * p.k * c
            spent = p.k * c  # everyone's first point
            total -= spent
            steps = p.max_points - 1
            if steps <= 0:
                continue
            e = p.pts.errors[:steps]  # state n = 1..steps points, deciding on point n+1
            rel = e / np.maximum(p.pts.energy, 1e-30)[None]
            if p.fisher is not None:
                # expected loss saved by point n+1, per weight it costs; kept non-increasing along n
                # so that a channel's points are taken in order (a prefix of one global sort)
                gain = p.fisher[None] * (e - p.pts.errors[1:steps + 1]) / p.k
                pri = p.sensitivity * np.minimum.accumulate(gain, axis=0)
            else:
                layer_energy = max(float(p.pts.energy.sum()), 1e-30)
                pri = p.sensitivity * np.minimum.accumulate(e, axis=0) / layer_energy
            pri = np.where(rel > epsilon, pri, -np.inf)  # done: error small enough
            if choice == "random":
                n = np.arange(steps, dtype=np.float64)[:, None]
                pri = np.where(np.isfinite(pri), -(n + rng.random(pri.shape)), -np.inf)
            keys.append(pri.ravel())
            step_cost = p.k * p.pts.bits[1:steps + 1] / p.pts.bits[0]  # point n+1 on its own grid
            costs.append(np.repeat(step_cost.astype(np.float64), c))
            owner.append(np.full(pri.size, li))
            chan.append(np.tile(np.arange(c), steps))
            order.append(np.repeat(np.arange(steps), c))
        counts = [np.ones(p.pts.errors.shape[1], np.int64) for p in group]
        if keys:
            key, cost = np.concatenate(keys), np.concatenate(costs)
            own, ch, n = np.concatenate(owner), np.concatenate(chan), np.concatenate(order)
            idx = np.lexsort((n, -key))  # largest priority first; a channel's own steps in order
            idx = idx[np.isfinite(key[idx])]
            take = idx[np.cumsum(cost[idx]) <= total + 1e-9]
            for li in np.unique(own[take]):
                sel = take[own[take] == li]
                np.add.at(counts[li], ch[sel], 1)
        for p, cnt in zip(group, counts):
            out[p.name] = cnt
    return out


def build(pts: Points, counts: np.ndarray, shape: tuple) -> WeightQuant:
    """The layer's WeightQuant: one term per point index, zeros where a channel has fewer points;
    each channel's coefficients are those fitted for its number of points."""
    used = int(counts.max())
    terms = []
    chans = np.arange(len(counts))
    for t in range(used):
        active = counts > t
        q = np.where(active[:, None], pts.q[t], 0).astype(np.int64).reshape(shape)
        scale = np.where(active, pts.coef[np.maximum(counts, t + 1) - 1, t, chans], pts.scales[t])
        terms.append((q, scale))
    point_bits = [int(b) for b in pts.bits[:used]]
    bpw = float(sum(b * np.mean(counts > t) for t, b in enumerate(point_bits)))
    scheme = {"scheme": "multipoint", "bits": point_bits[0], "point_bits": point_bits, "narrow_range": True,
              "points": used, "mean_points": float(counts.mean())}
    return WeightQuant(scheme, terms, bpw, {"points_per_channel": counts.astype(np.int64)})


def channel_errors(pts: Points, counts: np.ndarray) -> np.ndarray:
    """Output error of every channel with its allocated number of points."""
    return pts.errors[counts - 1, np.arange(len(counts))]


def plan_layers(graph: Graph, stats, recipe: dict) -> list[LayerPlan]:
    """Every layer's greedy points (refitted where the recipe says), the layers searched at once."""
    mp = recipe["multipoint"]
    matches = override_matches(graph, recipe["overrides"])
    fisher = getattr(stats, "fisher", {}) if mp["priority"] == "fisher" else None
    if fisher is not None and not all(op.name in fisher for op in graph.weighted_ops()):
        raise RecipeError("multipoint.priority = 'fisher' needs the Fisher sensitivity: set calibration.sensitivity_samples > 0 "
                          "(or multipoint.priority = 'energy')")

    def plan(op) -> LayerPlan:
        bits = layer_setting(recipe, "multipoint.bits", op.name, matches)
        extra_bits = layer_setting(recipe, "multipoint.extra_bits", op.name, matches)
        maxp = layer_setting(recipe, "multipoint.max_points", op.name, matches)
        sens = layer_setting(recipe, "multipoint.sensitivity", op.name, matches)
        err = layer_error(op, stats, output_error=mp["objective"] == "output")
        c, k = op.weight_matrix_shape
        w = op.weight.reshape(c, k)
        pts = greedy_points(w, bits, maxp, err, extra_bits=min(extra_bits, bits), screen=mp["screen"])
        if mp["coefficients"] == "refit":
            pts = refit_coefficients(w, pts, err)
        return LayerPlan(op.name, pts, bits, maxp, sens, k, None if fisher is None else fisher[op.name])

    return per_layer(plan, graph.weighted_ops(), description="multipoint points (layers)")


@register("multipoint", sections={"multipoint": MULTIPOINT_SECTION}, override_keys=("multipoint.bits", "multipoint.extra_bits", "multipoint.max_points", "multipoint.sensitivity"),
          reads_fisher=lambda recipe: recipe["multipoint"]["priority"] == "fisher")
def quantize(graph: Graph, stats, recipe: dict) -> dict[str, WeightQuant]:
    mp = recipe["multipoint"]
    if mp["budget"] > max(1, mp["max_points"]) and mp["budget_scope"] == "layer":
        raise RecipeError(f"multipoint.budget {mp['budget']:g} exceeds multipoint.max_points {mp['max_points']}")
    plans = plan_layers(graph, stats, recipe)
    counts = allocate_points(plans, mp["budget"], mp["budget_scope"], mp["channel_choice"], mp["epsilon"], mp["seed"])
    ops = {op.name: op for op in graph.weighted_ops()}
    return {p.name: build(p.pts, counts[p.name], ops[p.name].weight.shape) for p in plans}
