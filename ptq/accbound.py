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


TOP_FIRST = 256  # the largest magnitudes sorted first per row; the rest only where the support is wider


def _threshold(u: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For magnitudes u (n, m) sorted in descending order — a row's m largest — and radii r (n,):
    the projection's threshold θ from them, and whether the support may reach past them (then the
    row needs more of its magnitudes)."""
    css = np.cumsum(u, axis=1)
    j = np.arange(1, u.shape[1] + 1)
    cond = u - (css - r[:, None]) / j > 0
    rho = np.maximum(cond.shape[1] - 1 - np.argmax(cond[:, ::-1], axis=1), 0)
    theta = np.maximum((css[np.arange(len(u)), rho] - r) / (rho + 1), 0.0)
    return theta, cond[:, -1]


def project_l1(v: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row of v (C, K) onto {‖x‖₁ ≤ radius_c}; rows already inside are kept.

    The sort-based threshold of Duchi et al. needs a row's magnitudes in descending order only as
    far as its support: the `TOP_FIRST` largest are partitioned off and sorted first, and rows whose
    support reaches past them are sorted 4× as far, then fully. The cumulative sums over the
    prefix are those of a full sort, so θ is the same bits."""
    a = np.abs(v)
    out = v.copy()
    rows = np.flatnonzero(a.sum(1) > radius)
    if rows.size == 0:
        return out
    a, r = a[rows], radius[rows]
    k = a.shape[1]
    theta = np.empty(len(rows))
    todo, m = np.arange(len(rows)), TOP_FIRST
    while todo.size:
        m = min(m, k)
        top = a[todo] if m == k else np.partition(a[todo], k - m, axis=1)[:, k - m:]
        t, wider = _threshold(-np.sort(-top, axis=1), r[todo])
        done = ~wider | (m == k)
        theta[todo[done]] = t[done]
        todo, m = todo[~done], 4 * m
    theta = np.where(r > 0, theta, np.inf)  # radius 0: the ball is the origin
    out[rows] = np.sign(v[rows]) * np.maximum(a - theta[:, None], 0.0)
    return out


FIT_ELEMENTS = 1 << 21  # weights fitted per batch of rows: 16 MB float64 temporaries stay in the heap


def fit_l1(v: np.ndarray, radius: np.ndarray, qmax: int) -> np.ndarray:
    """Integers q (C, K) with |q| ≤ qmax and ‖q_c‖₁ ≤ radius_c, close to the real-valued v (C, K).

    Projection, round half away from zero, then the fewest entries that were rounded up in magnitude
    are rounded toward zero — those with the smallest fractional part first (the least extra error;
    the lower column first among equal ones) — until the channel fits. Rounding all of them toward
    zero gives Σ⌊|p|⌋ ≤ ‖p‖₁ ≤ radius, so the bound always holds. Rows are independent and fitted a
    batch at a time.
    """
    radius = np.floor(np.asarray(radius, np.float64))
    out = np.empty(v.shape, np.int64)
    step = max(1, FIT_ELEMENTS // max(v.shape[1], 1))
    for i in range(0, len(v), step):
        out[i:i + step] = _fit_rows(v[i:i + step], radius[i:i + step], qmax)
    return out


def _fit_rows(v: np.ndarray, radius: np.ndarray, qmax: int) -> np.ndarray:
    p = project_l1(np.clip(v, -qmax, qmax), radius)
    a = np.abs(p)
    mag = np.floor(a)
    frac = a - mag
    up = frac >= 0.5
    mag += up
    excess = np.maximum(mag.sum(1) - radius, 0).astype(np.int64)
    rows = np.flatnonzero(excess)
    if rows.size:
        key = np.where(up[rows], frac[rows], np.inf)  # only rounded-up entries are candidates
        e = excess[rows]
        # the e-th smallest key per row; every key below it is rounded down, then equal ones by column
        least = np.sort(np.partition(key, e.max() - 1, axis=1)[:, :e.max()], axis=1)
        t = least[np.arange(len(rows)), e - 1][:, None]
        down = key < t
        ties = key == t
        down |= ties & (np.cumsum(ties, axis=1) <= (e - down.sum(1))[:, None])
        mag[rows] -= down
    return np.copysign(mag, p).astype(np.int64)


def datatype_bits(k: int, input_max: int, weight_bits: int, bias_max: float = 0.0) -> int:
    return int(bits_for(datatype_bound(k, input_max, weight_bits, bias_max)))


def input_max_for(bits: int) -> int:
    """X for unsigned N-bit activations with the zero point at an end of the range (the worst case)."""
    return (1 << bits) - 1


__all__ = ["limit", "bits_for", "datatype_bound", "datatype_bits", "weight_level_bound", "l1_radius",
           "project_l1", "fit_l1", "input_max_for"]
