"""The rounding engine: how a layer's real weights become integers on the grid its method chose.

A method decides a layer's grid (scales, bits, points, planes, a SWIS group's shift set, an
accumulator budget) and rounds each weight to its nearest grid value. The engine then re-decides the
integers per layer by `weights.rounding` (per layer through [[overrides]]):

- `nearest`: the method's integers, unchanged.
- `feedback`: GPTQ/OBQ error feedback (Frantar et al. 2022; docs/ALGORITHMS.md "rounding"). The
  input columns are decided one at a time; each column's rounding error is pushed onto the columns
  not yet decided through the upper Cholesky factor of H⁻¹, with lazy block updates, damping, and
  the order natural or by descending diag(H). Vectorised over channels and over the groups of a
  grouped or depthwise conv. The scales stay fixed. A channel keeps its feedback integers only where
  they lower its output error on the calibration H (sampled H can make feedback worse on a channel).
  With `rounding.sequential`, each feedback layer's H is measured instead on its inputs in the
  model quantized so far (earlier layers' integers as decided, every tensor fake-quantized: the
  walk of `ptq.methods.walk`) over the first `rounding.samples` calibration samples. Its target
  (`rounding.target`) is either the layer's own output on those quantized inputs (`layer`: min
  ‖W·x_q − Q·x_q‖) or the FP32 model's output of the layer (`float`: min ‖W·x_fp − Q·x_q‖, as in
  GPTAQ, Li et al. 2025), which lets a layer also undo the error its input carries. The float
  target reduces to the first on a moved weight: with H = E[x_q x_qᵀ] and D = E[(x_fp − x_q) x_qᵀ]
  over the same patches, ‖W·x_fp − Q·x_q‖² = ‖(W̃ − Q)·x_q‖² + const for W̃ = W + W·D·H⁻¹, so feedback
  rounds W̃ on H. W̃ is a least-squares fit to the patches of the first `rounding.samples` samples
  (Lite0's last 1×1 convs have K = 1152 inputs and 49 positions per sample), so it is ridge-damped
  by `rounding.target_damp` · mean diag H, heavily by default (BENCHMARKS.md has the measured
  dampings). The recorded errors are on that H and target. Measured on the digits CNN the layer
  target is slightly worse than the FP32 H, hence sequential statistics are off by default.
- `learned`: block-wise AdaRound (`ptq.methods.learned`); with `rounding.start = "feedback"` it
  starts from error feedback's integers, each weight's pair around the value feedback rounded
  (`feedback_integers(..., updated)`).

Every scheme reaches the engine through its grid (`ptq.ir.grids`): uniform and bit-plane windows on
their b-bit grid; SWIS magnitudes on the shift sets the method chose; multipoint on each channel's
last point, against the residual of its earlier points; the accumulator method's layers with a
running budget per channel (total ℓ1 mass, or each sign's for one-sided inputs), so its bound holds
by construction (AXE, Colbert et al. 2024).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from ..calib.collect import layer_patches, layer_positions, moments_of, skip_patch_positions
from ..calib.progress import progress
from ..determinism import single_threaded_map
from ..errors import RecipeError
from ..ir import Graph, LayerWeights, Op, WeightQuant
from ..ir.grids import Grid, settle, term_grids
from .base import error_record, per_layer, rounding_targets
from .errormodel import ErrorModel, fixed_order, ridge_level, search_ridge
from .fields import layer_setting
from .selectors import override_matches
from .walk import mirrors, walk

SEED = 0  # the patch positions' seed of the sequential H


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + λI per group (G, K, K), λ = damp·mean(diag H) (at least 10⁻⁶ of it)."""
    mean = torch.diagonal(h, dim1=1, dim2=2).mean(-1).clamp_min(1e-12)
    return h + (max(damp, 1e-6) * mean)[:, None, None] * torch.eye(h.shape[-1], dtype=h.dtype)


def _inverse_factor(h: torch.Tensor, perm: torch.Tensor, diag: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H_p + λI)⁻¹ per group, H_p = H with rows and columns in the order
    `perm` and its diagonal replaced by `diag` (already in that order), λ = damp·mean(diag H_p); λ
    grows ten-fold until H_p + λI is positive definite (sampled H of a layer with few patches can be
    singular). At most two K×K matrices live at once besides H: a 3×3 conv of 512 channels has
    K = 4608, 170 MB per matrix in float64."""
    g, k = perm.shape
    hp = h.gather(1, perm[:, :, None].expand(g, k, k))
    hp = hp.gather(2, perm[:, None, :].expand(g, k, k))
    on_diag = torch.diagonal(hp, dim1=1, dim2=2)
    mean = diag.mean(-1).clamp_min(1e-12)
    lam = max(damp, 1e-6)
    for _ in range(8):
        on_diag.copy_(diag + (lam * mean)[:, None])  # H_p + λI, in place
        l, info = torch.linalg.cholesky_ex(hp)
        if not bool(info.any()):
            del hp, on_diag
            inverse = torch.cholesky_inverse(l)
            del l
            return torch.linalg.cholesky(inverse, upper=True)
        lam *= 10
    raise RuntimeError("the layer's input second moment stays singular after damping")


def feedback_integers(x: np.ndarray, hessian: np.ndarray, grid: Grid, order: str = "diag", damp: float = 0.01,
                      block: int = 128, budget: np.ndarray | None = None,
                      updated: list[np.ndarray] | None = None) -> np.ndarray:
    """Integers (C, K) for real weights x (C, K) in units of their scale, decided column by column
    with error feedback through the layer's input second moment `hessian` (G, K, K), one per conv
    group (channels c·G/C..). `budget` (C, 3): running budgets per channel of Σq⁺, Σq⁻ and Σ|q|
    (`accbound.mass_budgets`; ∞ where there is no limit of that kind). `updated`, when given, gets
    each weight's value as it was rounded, the earlier columns' errors pushed onto it (C, K)."""
    c, k = x.shape
    g = hessian.shape[0]
    cg = c // g
    with fixed_order():
        h = torch.from_numpy(np.asarray(hessian, np.float64))
        diag = torch.diagonal(h, dim1=1, dim2=2).clone()
        diag[diag <= 0] = 1.0  # an input that is always zero: nothing flows through it
        if order == "diag":
            perm = torch.argsort(-diag, dim=1, stable=True)
        else:
            perm = torch.arange(k).expand(g, k)
        u = _inverse_factor(h, perm, diag.gather(1, perm), damp)
        cols = perm[:, None, :].expand(g, cg, k)
        xp = torch.from_numpy(np.array(x, np.float64)).reshape(g, cg, k).gather(2, cols).contiguous()
        q = torch.zeros_like(xp)
        seen = torch.zeros_like(xp) if updated is not None else None
        left = None if budget is None else torch.from_numpy(np.array(budget, np.float64)).reshape(g, cg, 3)
        for i1 in range(0, k, block):
            i2 = min(i1 + block, k)
            w1 = xp[:, :, i1:i2].clone()
            e1 = torch.zeros_like(w1)
            u1 = u[:, i1:i2, i1:i2]
            for j in range(i2 - i1):
                col = w1[:, :, j]
                if seen is not None:
                    seen[:, :, i1 + j] = col
                qj = grid.project(col.reshape(c, 1), cols[:, :, i1 + j].reshape(c, 1)).reshape(g, cg)
                if left is not None:  # AXE: never spend more of the channel's budgets than is left
                    sign = torch.sign(qj)
                    side = torch.where(sign > 0, left[..., 0], left[..., 1])
                    mag = torch.minimum(qj.abs(), torch.minimum(side, left[..., 2]))
                    qj = sign * mag
                    left[..., 0] -= mag * (sign > 0)
                    left[..., 1] -= mag * (sign < 0)
                    left[..., 2] -= mag
                q[:, :, i1 + j] = qj
                e = (col - qj) / u1[:, j, j][:, None]
                w1[:, :, j:] -= e[:, :, None] * u1[:, None, j, j:]
                e1[:, :, j] = e
            if i2 < k:
                xp[:, :, i2:] -= torch.bmm(e1, u[:, i1:i2, i2:])
        out = torch.zeros_like(q).scatter_(2, cols, q)
        if seen is not None:
            updated.append(torch.zeros_like(seen).scatter_(2, cols, seen).reshape(c, k).numpy())
    return out.reshape(c, k).numpy().astype(np.int64)


def feedback_layer(op: Op, hessian: np.ndarray | None, wq: WeightQuant, settings: dict,
                   cross: np.ndarray | None = None, starts: dict[int, np.ndarray] | None = None,
                   inputs: int = 0, ridge: float = 0.0, samples: int = 0) -> dict[str, float]:
    """Re-decide one layer's integers with error feedback through its input second moment `hessian`
    (in place); the output error before and after. With the cross moment `cross` (D) the integers
    aim at the float target (`float_target`), else at the layer's own weights. Without H (no inputs
    seen) nothing changes. `starts`, when given, gets per decided term the real values (C, K, in
    units of the scale) its integers were rounded from: feedback's updated weights on the channels
    that keep its integers, the term's own target elsewhere (the learned rounding's `start`).
    An H measured on `inputs` input vectors from `samples` calibration samples is damped by at least
    the level a search within the layer adds (`errormodel.ridge_level`, with the recipe's
    `weights.ridge`) and its channels judged on H + that ridge: on Lite0's classifier (at most a
    quarter as many inputs as it is wide) feedback with 64 samples and the recipe's 3% raised its
    held-out KL over nearest rounding by a quarter on two draws (BENCHMARKS.md, session 43)."""
    c = op.weight.shape[0]
    w = op.weight.reshape(c, -1).astype(np.float64)
    if cross is not None:
        w = float_target(w, hessian, cross, settings["target_damp"])
    damp, judged = settings["damp"], hessian
    level = 0.0 if hessian is None else ridge_level(hessian.shape[-1], inputs, ridge, samples)
    if level > 0:  # feedback on H + level·mean(diag H)·I
        damp = max(damp, level)
        judged = hessian + search_ridge(hessian, level)[:, None, None] * np.eye(hessian.shape[-1])
    err = ErrorModel(judged, c)
    before = err((w - wq.dequantized().reshape(c, -1)).astype(np.float32))
    if hessian is None:
        return error_record(before, before, err, w)
    grids = term_grids(wq)
    budget = wq.acc_budget
    current = before  # each channel's error with the integers it has so far
    for t, rows, aim in rounding_targets(wq, w):
        q, s = wq.terms[t]
        seen: list[np.ndarray] | None = [] if starts is not None else None
        new = feedback_integers(aim / s[:, None], hessian, grids[t], settings["order"], damp,
                                settings["block"], budget, seen)  # a budget comes only with single-term layers
        trial = wq.terms[:t] + [(np.where(rows[:, None], new, q.reshape(c, -1)).reshape(q.shape), s)] + wq.terms[t + 1:]
        e_new = err((w - WeightQuant(wq.scheme, trial, wq.bits, wq.extra).dequantized().reshape(c, -1)).astype(np.float32))
        keep = rows & (e_new < current)
        wq.terms[t] = (np.where(keep.reshape(-1, *([1] * (q.ndim - 1))), trial[t][0], q).astype(np.int64), s)
        current = np.where(keep, e_new, current)
        if starts is not None:
            starts[t] = np.where(keep[:, None], seen[0], aim / s[:, None])
    settle(wq)
    return error_record(before, current, err, w)


def sequential_moments(op: Op, xq: torch.Tensor, xf: torch.Tensor | None, positions: int,
                       size: int, workers: int | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """H = E[x_q x_qᵀ] over a layer's input patches (`calib.collect.layer_patches`, seeded positions)
    in the model quantized so far, `size` samples at a time, and with its FP32 input `xf` the cross
    moment D = E[(x_fp − x_q) x_qᵀ] over the same patches (each group's (K, K)); and how many
    patches they were measured on.

    Copied patches in one float32 GEMM, not `calib.shifted`'s maps: with the maps `bitplane-4.5`
    measured KL 0.065/0.092/0.065 on three draws instead of 0.053/0.078/0.050, and this GEMM in
    float64 gave the maps' figure on the third to the last digit (BENCHMARKS.md, session 33). Its
    tuning was measured on this GEMM's rounding; moving to exact sums is a retuning, not a speed change.

    The mini-batches run on `workers` threads (`single_threaded_map`), each from the positions'
    generator state the in-order pass reaches it with, and merge in order: the same bits as one
    thread, in about half the time on two cores (the walk that calls this is single-threaded)."""
    gen = torch.Generator().manual_seed(SEED)
    starts = range(0, xq.shape[0], size)
    states = []
    for _ in starts:
        states.append(gen.get_state())
        skip_patch_positions(op, xq.shape, positions, gen)

    def chunk(item: tuple[int, torch.Tensor]):
        i, state = item
        pq = layer_patches(op, xq[i:i + size], positions, torch.Generator().set_state(state))
        if xf is None:
            return moments_of(pq), None
        pf = layer_patches(op, xf[i:i + size], positions, torch.Generator().set_state(state))
        return moments_of(pq), torch.bmm((pf - pq).transpose(1, 2), pq).double()

    total, d = None, None
    for m, part in single_threaded_map(chunk, zip(starts, states), workers):
        total = m if total is None else total.merge(m)
        if part is not None:
            d = part if d is None else d + part
    return total.hessian, None if d is None else (d / total.count).numpy(), total.count


def float_target(w: np.ndarray, hessian: np.ndarray, cross: np.ndarray, damp: float) -> np.ndarray:
    """W̃ = W + W·D·(H + λI)⁻¹ per group (module docstring), λ = damp·mean(diag H): the real weights
    whose output on the quantized inputs is nearest, in least squares, to W's on the FP32 inputs."""
    c, k = w.shape
    g = hessian.shape[0]
    with fixed_order():
        wg = torch.from_numpy(w).reshape(g, c // g, k)
        hd = _damped(torch.from_numpy(hessian), damp)
        moved = torch.linalg.solve(hd, torch.bmm(wg, torch.from_numpy(cross)).transpose(1, 2)).transpose(1, 2)
    return w + moved.reshape(c, k).numpy()


def _learned_starts(graph: Graph, stats, settings: dict, weights: LayerWeights,
                    learned: list[str], ridge: float) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, np.ndarray] | None]:
    """With `rounding.start = "feedback"`, error feedback on the learned layers (in place, on the
    calibration H) and each one's updated weights (`feedback_layer`'s `starts`), with the method's
    nearest weights taken before it (the records' "nearest"); else nothing to hand over."""
    if settings["start"] != "feedback":
        return {}, None
    ops = [op for op in graph.weighted_ops() if op.name in learned]
    nearest = {op.name: weights[op.name].dequantized() for op in ops}
    starts: dict[str, dict[int, np.ndarray]] = {op.name: {} for op in ops}

    per_layer(lambda op: _on_calibration_h(op, stats, weights, settings, ridge, starts[op.name]), ops, stats,
              "error-feedback rounding (the learned rounding's start, layers)")
    return starts, nearest


def _on_calibration_h(op: Op, stats, weights: LayerWeights, settings: dict, ridge: float,
                      starts: dict[int, np.ndarray] | None = None) -> dict[str, float]:
    """`feedback_layer` on the layer's input moments from the calibration statistics (FP32 model);
    `ridge`: the recipe's `weights.ridge`."""
    li = stats.layer_inputs.get(op.name) if stats is not None else None
    return feedback_layer(op, None if li is None else li.hessian, weights[op.name], settings, starts=starts,
                          inputs=0 if li is None else li.count, ridge=ridge, samples=0 if li is None else stats.samples)


def apply_rounding(graph: Graph, stats, recipe: dict, weights: LayerWeights,
                   moments_read: Callable[[], None] | None = None) -> None:
    """Re-decide every layer's integers by its `weights.rounding` (in place) and record per layer the
    rounding and the relative output error it removed in `weights.info["rounding"]`. `moments_read`
    is called once no step will read the layer input moments again, before the walk over the model
    quantized so far (which measures what it needs on the fly): the one-shot quantize frees them
    there, so that the walk's feature maps do not stack on them."""
    matches = override_matches(graph, recipe["overrides"])
    modes = {op.name: layer_setting(recipe, "weights.rounding", op.name, matches) for op in graph.weighted_ops()}
    if all(m == "nearest" for m in modes.values()):
        return
    settings = recipe["rounding"]
    report: dict[str, Any] = {}
    learned = [name for name, m in modes.items() if m == "learned"]
    feedback = [name for name, m in modes.items() if m == "feedback"]
    sequential = settings["sequential"] and bool(feedback)
    ridge = recipe["weights"]["ridge"]
    starts, nearest = _learned_starts(graph, stats, settings, weights, learned, ridge) if learned else ({}, None)

    if settings["target"] == "float" and not settings["sequential"] and feedback:
        raise RecipeError("rounding.target = 'float' needs the FP32 and quantized inputs of the sequential pass: "
                          "set rounding.sequential = true as well")
    to_float = sequential and settings["target"] == "float"

    threads = torch.get_num_threads()  # the walk runs single-threaded; its layers' moments use every thread
    walk_bar = progress("error-feedback rounding (walk, layers)", len(feedback)) if sequential else nullcontext(lambda n=1: None)
    with walk_bar as advance:
        def on_layer(op: Op, xq: torch.Tensor, xf: torch.Tensor | None) -> None:  # H from the model quantized so far
            cal = recipe["calibration"]
            h, d, count = sequential_moments(op, xq, xf if to_float else None,
                                             layer_positions(op, cal["positions"], cal["grouped_positions"]),
                                             settings["batch_size"], threads)
            report[op.name] = {"rounding": "feedback", **feedback_layer(op, h, weights[op.name], settings, d, inputs=count,
                                                                               ridge=ridge, samples=xq.shape[0])}
            advance()

        if not sequential:
            ops = [op for op in graph.weighted_ops() if op.name in feedback]
            recs = per_layer(lambda op: _on_calibration_h(op, stats, weights, settings, ridge), ops, stats,
                             "error-feedback rounding (layers)")
            report.update({op.name: {"rounding": "feedback", **rec} for op, rec in zip(ops, recs)})
        visit = feedback if sequential else []
        if moments_read is not None:
            moments_read()
        if learned:
            from .learned import learn_rounding
            for name, rec in learn_rounding(graph, stats, recipe, weights, learned, visit, on_layer, to_float,
                                            starts, nearest).items():
                report[name] = {"rounding": "learned", **rec}
        elif sequential:
            walk(graph, stats, recipe, weights, [], layers=visit, on_layer=on_layer, float_inputs=to_float)
    if mirrors(graph, settings):  # every layer decided on the walk saw the mirror images
        for name in [*learned, *visit]:
            report[name]["mirrored"] = True
    for op in graph.weighted_ops():
        report.setdefault(op.name, {"rounding": "nearest"})
    weights.info["rounding"] = report


__all__ = ["apply_rounding", "feedback_integers", "feedback_layer", "float_target", "sequential_moments"]
