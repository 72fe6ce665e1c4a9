"""Accumulator bounds, and making integer weights fit a P-bit accumulator without training.

A conv/linear output accumulates acc = Σ q_w·(q_x − z_x) + q_b. With |q_x − z_x| ≤ X (X = 2^N − 1
for N-bit inputs whose zero point sits at an end of the range, as after ReLU):

- data-type bound (de Bruin et al. 2020): |acc| ≤ K · X · (2^(M−1) − 1) + |q_b|: needs only the
  widths N, M and the dot length K; conservative.
- weight-level bound (A2Q, Colbert et al. 2023): |acc| ≤ ‖q_w‖₁ · X + |q_b| per output channel;
  exact in the worst case over inputs and tighter by the weights' sparsity. A channel fits P bits
  when this is ≤ 2^(P−1) − 1, so ‖q_w‖₁ ≤ (2^(P−1) − 1 − |q_b|) / X.

`fit_l1` makes every channel meet the weight-level bound: project the real-valued integer-domain
weights w/s onto the L1 ball of the allowed radius (the sort-based simplex projection of Duchi et
al. 2008, vectorised over channels), round to nearest, and where rounding up in magnitude breaks the
bound, round those entries toward zero instead, least damaging first (AXE-style L1 control).
"""
from __future__ import annotations

import numpy as np

from .intmath import qmax


def limit(bits: int) -> int:
    """Largest magnitude a signed `bits`-bit accumulator holds (the symmetric limit, as for weights)."""
    return qmax(bits)


def bits_for(magnitude: float | np.ndarray) -> np.ndarray:
    """Least signed accumulator width holding |acc| ≤ magnitude (elementwise)."""
    m = np.asarray(magnitude, np.float64)
    return (np.ceil(np.log2(m + 1)) + 1).astype(np.int64)


def datatype_bound(k: int, input_max: int, weight_bits: int, bias_max: float = 0.0) -> int:
    """Worst |acc| from the widths alone (de Bruin): K · X · (2^(M−1) − 1) + max|q_b|."""
    return int(k * input_max * qmax(weight_bits) + bias_max)


def weight_level_bound(q: np.ndarray, input_max: int, bias_q: np.ndarray | None = None) -> np.ndarray:
    """Worst |acc| per output channel (A2Q): ‖q_c‖₁ · X + |q_b,c|."""
    q = np.asarray(q).reshape(q.shape[0], -1).astype(np.float64)
    b = np.zeros(q.shape[0]) if bias_q is None else np.abs(np.asarray(bias_q, np.float64))
    return np.abs(q).sum(1) * input_max + b


def l1_radius(bits: int, input_max: int, bias_q: np.ndarray) -> np.ndarray:
    """Per channel, the largest ‖q_c‖₁ whose worst case fits `bits`: ⌊(2^(P−1) − 1 − |q_b|) / X⌋ (≥ 0)."""
    room = limit(bits) - np.abs(np.asarray(bias_q, np.float64))
    return np.floor(np.maximum(room, 0.0) / max(input_max, 1))


def project_l1(v: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of v (C, K) onto {‖x‖₁ ≤ radius_c}; rows already inside are kept."""
    a = np.abs(v)
    out = v.copy()
    rows = np.flatnonzero(a.sum(1) > radius)
    if rows.size == 0:
        return out
    a, r = a[rows], radius[rows]
    u = -np.sort(-a, axis=1)
    css = np.cumsum(u, axis=1)
    j = np.arange(1, v.shape[1] + 1)
    cond = u - (css - r[:, None]) / j > 0
    rho = np.maximum(cond.shape[1] - 1 - np.argmax(cond[:, ::-1], axis=1), 0)
    theta = np.maximum((css[np.arange(len(rows)), rho] - r) / (rho + 1), 0.0)
    theta = np.where(r > 0, theta, np.inf)  # radius 0: the ball is the origin
    out[rows] = np.sign(v[rows]) * np.maximum(a - theta[:, None], 0.0)
    return out


def fit_l1(v: np.ndarray, radius: np.ndarray, qmax: int) -> np.ndarray:
    """Integers q (C, K) with |q| ≤ qmax and ‖q_c‖₁ ≤ radius_c, close to the real-valued v (C, K).

    Projection, round half away from zero, then the fewest entries that were rounded up in magnitude
    are rounded toward zero — those with the smallest fractional part first (the least extra error)
    — until the channel fits. Rounding all of them toward zero gives Σ⌊|p|⌋ ≤ ‖p‖₁ ≤ radius, so
    the bound always holds.
    """
    radius = np.floor(np.asarray(radius, np.float64))
    p = project_l1(np.clip(v, -qmax, qmax), radius)
    a = np.abs(p)
    fl = np.floor(a)
    frac = a - fl
    up = frac >= 0.5
    mag = fl + up
    excess = np.maximum(mag.sum(1) - radius, 0).astype(np.int64)
    rows = np.flatnonzero(excess)
    if rows.size:
        key = np.where(up[rows], frac[rows], np.inf)  # only rounded-up entries are candidates; smallest frac first
        order = np.argsort(key, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(v.shape[1])[None].repeat(len(rows), 0), axis=1)
        mag[rows] -= up[rows] & (rank < excess[rows, None])
    return (np.sign(p) * mag).astype(np.int64)


def datatype_bits(k: int, input_max: int, weight_bits: int, bias_max: float = 0.0) -> int:
    return int(bits_for(datatype_bound(k, input_max, weight_bits, bias_max)))


def input_max_for(bits: int) -> int:
    """X for unsigned N-bit activations with the zero point at an end of the range (the worst case)."""
    return (1 << bits) - 1


__all__ = ["limit", "bits_for", "datatype_bound", "datatype_bits", "weight_level_bound", "l1_radius",
           "project_l1", "fit_l1", "input_max_for"]
