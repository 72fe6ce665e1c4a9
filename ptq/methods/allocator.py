"""Mixed precision as a small integer program: one candidate per layer, least total error, within budgets.

Every method that has per-layer knobs (weight bits, input activation bits, points, planes, SWIS N)
describes each layer's options as `Candidate`s — a measured error on calibration data and costs —
and `allocate` picks one per layer:

    minimise   Σ_lj E_lj · x_lj
    subject to Σ_j x_lj = 1                       (one candidate per layer)
               Σ_b y_tb = 1,  x_lj ≤ y_t(l),b(j)  (activation bits belong to a tensor: its consumers agree)
               Σ_lj cost_k,lj · x_lj ≤ B_k        (each budget: weight bits, BOPs, cycles, ...)
               x_lj = 0 where acc_bits_lj > P     (hard accumulator constraint)
               x_l,pinned = 1                     (recipe pins)

x, y binary; solved by cvxpy with a MILP solver (HiGHS, directly or through SciPy). Dominated
candidates (another with the same input bits is no worse in error and every cost) are dropped first,
which keeps the program small. Without a MILP solver — or with `solver="greedy"` — a Lagrangian
greedy is used: for a multiplier λ each tensor group takes, per input width, every layer's best
E + λ·cost and the width with the least sum; λ is bisected until the first budget holds. It is exact
when the budget curve is convex and otherwise close; it is documented as a fallback, not the default.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import BudgetError


@dataclass
class Candidate:
    knobs: dict[str, Any]  # e.g. {"weight_bits": 4, "input_bits": 8}
    error: float  # measured on calibration data, in one currency across layers
    costs: dict[str, float]  # e.g. {"weight_bits": params·bits, "bops": macs·wb·ab}
    acc_bits: int  # least accumulator width this candidate needs (data-free)
    payload: Any = None  # what the method needs to materialise it


@dataclass
class LayerChoices:
    layer: str
    input_tensor: str | None  # tensor whose bits the candidates' "input_bits" set (None: not shared)
    candidates: list[Candidate]
    pinned: int | None = None  # index of a forced candidate


@dataclass
class Allocation:
    choice: dict[str, Candidate]
    input_bits: dict[str, int]
    solver: str
    status: str
    objective: float
    seconds: float
    budgets: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What the manifest records (the solve time goes to the report: see `timings`)."""
        return {"solver": self.solver, "status": self.status, "objective": self.objective,
                "budgets": self.budgets, "used": self.used}

    def timings(self) -> dict[str, float]:
        return {"allocator_seconds": round(self.seconds, 4)}


def _ibits(c: Candidate) -> int | None:
    return c.knobs.get("input_bits")


def _feasible(layers: list[LayerChoices], p: int | None) -> list[list[int]]:
    """Indices of each layer's usable candidates: fitting P, not dominated, or the pinned one."""
    keep = []
    for lc in layers:
        if lc.pinned is not None:
            keep.append([lc.pinned])
            continue
        ok = [j for j, c in enumerate(lc.candidates) if p is None or c.acc_bits <= p]
        if not ok:
            least = min(c.acc_bits for c in lc.candidates)
            raise BudgetError(f"no candidate of layer {lc.layer} fits a {p}-bit accumulator (the least it needs is "
                              f"{least} bits); raise accumulator.bits or allow fewer bits for this layer")
        keys = sorted({k for j in ok for k in lc.candidates[j].costs})
        arr = np.array([[lc.candidates[j].error] + [lc.candidates[j].costs.get(k, 0.0) for k in keys] for j in ok])
        groups = np.array([_ibits(lc.candidates[j]) or 0 for j in ok])
        undominated = []
        for i, j in enumerate(ok):
            same = groups == groups[i]
            le = np.all(arr[same] <= arr[i], axis=1)
            lt = np.any(arr[same] < arr[i], axis=1)
            earlier_equal = np.all(arr[same] == arr[i], axis=1) & (np.flatnonzero(same) < i)
            if not np.any(le & lt) and not np.any(earlier_equal):
                undominated.append(j)
        keep.append(undominated)
    return keep


def _check_budgets(layers: list[LayerChoices], keep: list[list[int]], budgets: dict[str, float]) -> None:
    for key, b in budgets.items():
        least = sum(min(lc.candidates[j].costs.get(key, 0.0) for j in js) for lc, js in zip(layers, keep))
        if least > b * (1 + 1e-12):
            raise BudgetError(f"budget {key} = {b:g} cannot be met: the least any choice needs is {least:g} "
                              f"(with the accumulator limit and pins); raise the budget to at least that", key, least)


def solve_allocation(layers: list[LayerChoices], budgets: dict[str, float], accumulator_bits: int | None = None,
             solver: str = "auto") -> Allocation:
    """One candidate per layer minimising total error within `budgets` (upper bounds on Σ costs[key])."""
    t0 = time.perf_counter()
    keep = _feasible(layers, accumulator_bits)
    _check_budgets(layers, keep, budgets)
    name = solver
    if solver == "auto":
        name = _milp_solver() or "greedy"
    if name == "greedy":
        picks, status = _greedy(layers, keep, budgets)
    else:
        picks, status = _milp(layers, keep, budgets, name)
    choice = {lc.layer: lc.candidates[j] for lc, j in zip(layers, picks)}
    ibits = {lc.input_tensor: _ibits(choice[lc.layer]) for lc in layers
             if lc.input_tensor is not None and _ibits(choice[lc.layer]) is not None}
    used = {k: float(sum(c.costs.get(k, 0.0) for c in choice.values())) for k in budgets}
    return Allocation(choice, ibits, name, status, float(sum(c.error for c in choice.values())),
                      time.perf_counter() - t0, dict(budgets), used)


def _milp_solver() -> str | None:
    import cvxpy as cp
    installed = cp.installed_solvers()
    for s in ("HIGHS", "SCIPY", "GLPK_MI", "CBC", "SCIP"):
        if s in installed:
            return s
    return None


def _milp(layers: list[LayerChoices], keep: list[list[int]], budgets: dict[str, float], solver: str):
    import cvxpy as cp
    n = sum(len(js) for js in keep)
    x = cp.Variable(n, boolean=True)
    index = []  # (layer position, candidate index) per variable
    for li, js in enumerate(keep):
        index += [(li, j) for j in js]
    err = np.array([layers[li].candidates[j].error for li, j in index])
    scale = max(float(np.abs(err).max()), 1e-300)
    cons = []
    start = 0
    for js in keep:
        cons.append(cp.sum(x[start:start + len(js)]) == 1)
        start += len(js)
    for key, b in budgets.items():
        cost = np.array([layers[li].candidates[j].costs.get(key, 0.0) for li, j in index])
        s = max(float(np.abs(cost).max()), 1.0)
        cons.append((cost / s) @ x <= b / s)
    tensors: dict[str, dict[int, list[int]]] = {}
    for v, (li, j) in enumerate(index):
        t, ib = layers[li].input_tensor, _ibits(layers[li].candidates[j])
        if t is not None and ib is not None:
            tensors.setdefault(t, {}).setdefault(ib, []).append(v)
    for t, by_bits in sorted(tensors.items()):
        if len(by_bits) < 2:
            continue
        y = cp.Variable(len(by_bits), boolean=True)
        cons.append(cp.sum(y) == 1)
        for yi, (_, vs) in enumerate(sorted(by_bits.items())):
            cons.append(x[vs] <= y[yi])
    prob = cp.Problem(cp.Minimize((err / scale) @ x), cons)
    try:
        with _solver_output_discarded():
            prob.solve(solver=solver)
    except cp.error.SolverError as exc:
        raise BudgetError(f"the MILP solver {solver} failed: {exc}; retry with solver='greedy'") from exc
    if prob.status not in ("optimal", "optimal_inaccurate") or x.value is None:
        raise BudgetError(f"no choice meets all budgets together ({', '.join(f'{k} ≤ {v:g}' for k, v in budgets.items())}); "
                          f"each alone is feasible — relax one of them (solver status: {prob.status})")
    val = x.value
    picks, start = [], 0
    for js in keep:
        picks.append(js[int(np.argmax(val[start:start + len(js)]))])
        start += len(js)
    return picks, prob.status


@contextlib.contextmanager
def _solver_output_discarded():
    """HiGHS prints a copyright banner from C on file descriptor 1 whatever cvxpy's `verbose`: send it
    to /dev/null (stdout belongs to --json, stderr to one-line messages); the solver's status is
    what ptq reports."""
    sys.stdout.flush()
    saved = os.dup(1)
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
        os.close(sink)


def _greedy(layers: list[LayerChoices], keep: list[list[int]], budgets: dict[str, float]):
    """Lagrangian greedy on the first budget (see the module docstring)."""
    key = next(iter(budgets), None)

    def pick(lam: float) -> list[int]:
        picks = [0] * len(layers)
        groups: dict[Any, list[int]] = {}
        for li, lc in enumerate(layers):
            groups.setdefault(lc.input_tensor if lc.input_tensor is not None else ("layer", li), []).append(li)
        for members in groups.values():
            widths = sorted({_ibits(layers[li].candidates[j]) for li in members for j in keep[li]}, key=lambda b: (b is None, b))
            best_total, best = np.inf, None
            for w in widths:
                total, chosen = 0.0, []
                for li in members:
                    opts = [j for j in keep[li] if _ibits(layers[li].candidates[j]) in (w, None)]
                    if not opts:
                        total = np.inf
                        break
                    score = [layers[li].candidates[j].error + lam * layers[li].candidates[j].costs.get(key, 0.0) for j in opts]
                    chosen.append(opts[int(np.argmin(score))])
                    total += min(score)
                if total < best_total:
                    best_total, best = total, chosen
            if best is None:
                raise BudgetError(f"the consumers of tensor {layers[members[0]].input_tensor} share no input width")
            for li, j in zip(members, best):
                picks[li] = j
        return picks

    def used(picks: list[int]) -> float:
        return sum(layers[li].candidates[j].costs.get(key, 0.0) for li, j in enumerate(picks))

    picks = pick(0.0)
    if key is not None and used(picks) > budgets[key]:
        lo, hi = 0.0, 1.0
        while used(pick(hi)) > budgets[key]:
            hi *= 4.0
            if hi > 1e300:
                raise BudgetError(f"budget {key} = {budgets[key]:g} cannot be met by the greedy allocator")
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if used(pick(mid)) > budgets[key] else (lo, mid)
        picks = pick(hi)
    for k, b in budgets.items():
        if sum(layers[li].candidates[j].costs.get(k, 0.0) for li, j in enumerate(picks)) > b * (1 + 1e-9):
            raise BudgetError(f"the greedy allocator met {key} but not {k} ≤ {b:g}; install a MILP solver (highspy)")
    return picks, "greedy"


__all__ = ["Allocation", "Candidate", "LayerChoices", "allocate"]
