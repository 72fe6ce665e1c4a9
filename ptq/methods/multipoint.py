"""Multipoint: each output channel as a sum of low-bit vectors (Liu et al., AAAI 2021).

    ŵ_c = Σ_i a_ci · v_ci,   v_ci on the symmetric narrow b-bit grid, a_ci > 0.

Greedy construction per channel (vectorised over channels and the coefficient grid): residual
r₀ = w; for each point search a on a 1-D grid, v = clip(round(r/a)), keep the a with the least
output error (w − ŵ)ᵀH(w − ŵ) (weight MSE without H), r ← r − a·v. Every channel's whole greedy
sequence up to `max_points` is computed once, so allocation is pure bookkeeping on error tables.

Allocation: every channel starts with one point; the point with the largest priority is added next
until the channel's relative error e/wᵀHw ≤ ε or the budget is spent. Priority (ours, default
`priority = "energy"`): the channel's output error divided by its layer's output energy Σ_c wᵀHw — its
relative error times its share of the layer output. `priority = "fisher"` ranks by the expected loss
the point saves, F_c · (e_n − e_{n+1}), per weight it costs, with F_c the channel's Fisher sensitivity
(`calib.sensitivity`). Measured on EfficientNet-Lite0 at 4.94 bits (128 held-out crops): energy 80.5%
top-1 / KL 0.098, fisher 71.1% / KL 0.084 — better KL and SQNR, worse top-1, so energy stays the
default. Either is multiplied by a per-layer `sensitivity` (1 unless a recipe override says otherwise).
The budget is the mean number of points per channel, parameter-weighted and global across the
network by default (so effective bits = bits × budget), or per layer (`budget_scope = "layer"`).
Because errors never increase with points, the greedy order equals one global sort of all candidate
increments, and the budget is a prefix of it: no Python loop over channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RecipeError
from ..graph import Graph
from ..recipe import Field, layer_setting, register_section
from ..validate import fail, need, scheme_check, tensor
from ..weightquant import OutputError, qmax
from . import register
from .base import WeightQuant, first_last, layer_error

GRID = 100  # coefficient candidates per point
GRID_LO = 0.05  # smallest candidate, as a fraction of max|r| / qmax
CHUNK = 1 << 22  # grid values × weights evaluated at once (float32 elements)

register_section("multipoint", {
    "bits": Field(4, int, lo=2, hi=8, help="bits of each point (symmetric narrow grid)"),
    "epsilon": Field(1e-4, float, lo=0.0, hi=1.0,
                     help="a channel whose relative output error e/wᵀHw is at most this gets no more points"),
    "budget": Field(1.25, float, lo=1.0, hi=16.0,
                    help="mean points per channel (parameter-weighted); effective bits = bits × budget"),
    "budget_scope": Field("global", str, ("global", "layer"),
                          help="spend the budget across the whole network or within each layer"),
    "channel_choice": Field("error", str, ("error", "random"),
                            help="which channels get extra points: largest error, or at random (ablation)"),
    "priority": Field("energy", str, ("energy", "fisher"),
                      help="rank extra points by Fisher-weighted output-error reduction per weight, or by "
                           "error relative to the layer's output energy"),
    "max_points": Field(4, int, lo=1, hi=16, help="most points a channel can have"),
    "objective": Field("output", str, ("output", "mse"), help="coefficient search by output error (H) or weight MSE"),
    "sensitivity": Field(1.0, float, lo=0.0, hi=1e6, help="per-layer weight of its errors in the global ranking"),
    "seed": Field(0, int, lo=0, hi=2**31 - 1, help="seed of the random channel choice"),
}, override_keys=("bits", "max_points", "sensitivity"))


@dataclass
class Points:
    """A layer's greedy sequence: point i of channel c is scales[i, c] · q[i, c]."""

    q: np.ndarray  # (P, C, K) int64
    scales: np.ndarray  # (P, C) float64, positive
    errors: np.ndarray  # (P, C): output error with 1..P points
    energy: np.ndarray  # (C,): wᵀHw (or ‖w‖²)


def _errors(err: OutputError, d: np.ndarray) -> np.ndarray:
    return err(np.ascontiguousarray(d, dtype=np.float32))


def _search(r: np.ndarray, ratios: np.ndarray, base: np.ndarray, m: int, err: OutputError,
            best_e: np.ndarray, best_a: np.ndarray) -> None:
    """Try a = ratios[t, c] · base[c] (ratios (T, C) or (T,)); keep the best a per channel in place."""
    c, k = r.shape
    ratios = np.broadcast_to(ratios.reshape(len(ratios), -1), (len(ratios), c))
    r32 = r.astype(np.float32)
    cols = np.arange(c)
    step = max(1, CHUNK // max(c * k, 1))
    for lo in range(0, len(ratios), step):
        a = (ratios[lo:lo + step] * base[None, :]).astype(np.float32)  # (T, C)
        v = np.clip(np.floor(r32[None] / a[..., None] + 0.5), -m, m)
        e = _errors(err, r32[None] - a[..., None] * v)  # (T, C)
        i = e.argmin(0)
        e_min = e[i, cols]
        better = e_min < best_e
        best_e[better] = e_min[better]
        best_a[better] = a[i, cols][better]


def greedy_points(w: np.ndarray, bits: int, points: int, err: OutputError,
                  grid: np.ndarray | None = None) -> Points:
    """The greedy multipoint sequence of every channel of a (C, K) weight, `points` deep.

    The coefficient of each point is searched on ratios of max|r|/qmax: the explicit `grid` if
    given, else (ours) a geometric grid of 100 values over [0.05, 1] searched coarse to fine — 25
    values, then 16 around each channel's best — as fine as the full grid at 40% of the cost.
    """
    m = qmax(bits)
    c, k = w.shape
    w = w.astype(np.float64)
    r = w.copy()
    qs = np.zeros((points, c, k), np.int64)
    scales = np.zeros((points, c))
    errors = np.zeros((points, c))
    cur = _errors(err, r)
    energy = cur.copy()
    fallback = np.abs(w).max(1) / m
    fallback = np.where(fallback > 0, fallback, 1.0)
    coarse = np.geomspace(GRID_LO, 1.0, GRID // 4)
    spread = coarse[1] / coarse[0]
    for p in range(points):
        amax = np.abs(r).max(1)
        base = np.where(amax > 0, amax / m, fallback)
        best_e = np.full(c, np.inf)
        best_a = base.copy()
        if grid is not None:
            _search(r, np.asarray(grid, np.float64), base, m, err, best_e, best_a)
        else:
            _search(r, coarse, base, m, err, best_e, best_a)
            fine = np.geomspace(1 / spread, spread, 16)[:, None] * (best_a / base)[None, :]
            _search(r, np.minimum(fine, 1.0), base, m, err, best_e, best_a)
        v = np.clip(np.floor(r / best_a[:, None] + 0.5), -m, m)
        e = _errors(err, r - best_a[:, None] * v)
        worse = e >= cur  # a point must not make a channel worse: leave it at zero
        v[worse] = 0
        e = np.where(worse, cur, e)
        qs[p] = v.astype(np.int64)
        scales[p] = best_a
        errors[p] = e
        r = r - best_a[:, None] * v
        cur = e
        fallback = best_a
    return Points(qs, scales, errors, energy)


@dataclass
class LayerPlan:
    name: str
    pts: Points
    bits: int
    max_points: int
    sensitivity: float
    k: int  # weights per channel: the cost of one point
    fisher: np.ndarray | None  # (C,) Fisher sensitivity of each output channel, or None


def allocate(plans: list[LayerPlan], budget: float, scope: str, choice: str, epsilon: float,
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
                pri = p.sensitivity * e / layer_energy
            pri = np.where(rel > epsilon, pri, -np.inf)  # done: error small enough
            if choice == "random":
                n = np.arange(steps, dtype=np.float64)[:, None]
                pri = np.where(np.isfinite(pri), -(n + rng.random(pri.shape)), -np.inf)
            keys.append(pri.ravel())
            costs.append(np.full(pri.size, float(p.k)))
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


def build(pts: Points, counts: np.ndarray, bits: int, shape: tuple) -> WeightQuant:
    """The layer's WeightQuant: one term per point index, zeros where a channel has fewer points."""
    used = int(counts.max())
    terms = []
    for t in range(used):
        active = (counts > t)[:, None]
        q = np.where(active, pts.q[t], 0).reshape(shape)
        terms.append((q, pts.scales[t].copy()))
    mean = float(counts.mean())
    scheme = {"scheme": "multipoint", "bits": bits, "narrow_range": True, "points": used, "mean_points": mean}
    return WeightQuant(scheme, terms, bits * mean, {"points_per_channel": counts.astype(np.int64)})


def channel_errors(pts: Points, counts: np.ndarray) -> np.ndarray:
    """Output error of every channel with its allocated number of points."""
    return pts.errors[counts - 1, np.arange(len(counts))]


def plan_layers(graph: Graph, stats, recipe: dict) -> list[LayerPlan]:
    mp = recipe["multipoint"]
    first, last = first_last(graph)
    plans = []
    for op in graph.weighted_ops():
        bits = layer_setting(recipe, "multipoint.bits", op.name, first, last)
        maxp = layer_setting(recipe, "multipoint.max_points", op.name, first, last)
        sens = layer_setting(recipe, "multipoint.sensitivity", op.name, first, last)
        err = layer_error(op, stats, output_error=mp["objective"] == "output")
        c, k = op.weight_matrix_shape
        pts = greedy_points(op.weight.reshape(c, k), bits, maxp, err)
        fisher = None
        if mp["priority"] == "fisher":
            if op.name not in getattr(stats, "fisher", {}):
                raise RecipeError("multipoint.priority = 'fisher' needs the Fisher sensitivity: set calibration.sensitivity_samples > 0 "
                                  "(or multipoint.priority = 'energy')")
            fisher = stats.fisher[op.name]
        plans.append(LayerPlan(op.name, pts, bits, maxp, sens, k, fisher))
    return plans


@register("multipoint")
def quantize(graph: Graph, stats, recipe: dict) -> dict[str, WeightQuant]:
    mp = recipe["multipoint"]
    if mp["budget"] > max(1, mp["max_points"]) and mp["budget_scope"] == "layer":
        raise RecipeError(f"multipoint.budget {mp['budget']:g} exceeds multipoint.max_points {mp['max_points']}")
    plans = plan_layers(graph, stats, recipe)
    counts = allocate(plans, mp["budget"], mp["budget_scope"], mp["channel_choice"], mp["epsilon"], mp["seed"])
    ops = {op.name: op for op in graph.weighted_ops()}
    return {p.name: build(p.pts, counts[p.name], p.bits, ops[p.name].weight.shape) for p in plans}


@scheme_check("multipoint")
def _multipoint(m, w: dict, where: str) -> None:
    terms = w["terms"]
    points = need(w, "points", int, where)
    if points != len(terms):
        raise fail(f"{where}.points", f"is {points} but the weight has {len(terms)} terms (one per point)")
    c = w["shape"][0]
    extra = need(w, "extra", dict, where)
    n = tensor(m, extra.get("points_per_channel"), f"{where}.extra.points_per_channel", "int", (c,))
    if n.size and (n.min() < 1 or n.max() > points):
        raise fail(f"{where}.extra.points_per_channel", f"values {int(n.min())}..{int(n.max())} fall outside [1, {points}]")
    mean = need(w, "mean_points", (int, float), where)
    if abs(mean - float(n.mean())) > 1e-6:
        raise fail(f"{where}.mean_points", f"is {mean:g} but points_per_channel averages {float(n.mean()):g}")
    bpw = need(w, "bits_per_weight", (int, float), where)
    if abs(bpw - w["bits"] * float(n.mean())) > 1e-6:
        raise fail(f"{where}.bits_per_weight", f"is {bpw:g}, expected bits × mean points = {w['bits'] * float(n.mean()):g}")
    for j, t in enumerate(terms[1:], start=1):
        q = m.tensor(t["q"]).reshape(c, -1)
        if np.any(q[n <= j] != 0):
            raise fail(f"{where}.terms[{j}].q", f"is non-zero on channels with at most {j} points")
