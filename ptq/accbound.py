"""Accumulator bounds, and making integer weights fit a P-bit accumulator without training.

A conv/linear output accumulates acc = Σ q_w·(q_x − z_x) + q_b, with q_x − z_x in [lo, hi]
(lo = −z_x ≤ 0 ≤ hi = 2^N − 1 − z_x for N-bit codes; lo = 0 after a ReLU). X = max(−lo, hi).

- data-type bound (de Bruin et al. 2020): |acc| ≤ K · X · (2^(M−1) − 1) + |q_b|: needs only the
  widths N, M and the dot length K; conservative.
- weight-level bound (A2Q, Colbert et al. 2023): |acc| ≤ ‖q_w‖₁ · X + |q_b| per output channel.
- **(ours, after A2Q+, Colbert et al. 2024)** the worst case over the input span, per channel, of
  every partial sum (any order, the bias anywhere): acc ≤ Σq⁺·hi + Σq⁻·(−lo) + max(q_b, 0) and
  −acc ≤ Σq⁺·(−lo) + Σq⁻·hi + max(−q_b, 0), with Σq⁺ and Σq⁻ the masses of the positive and
  negative integers (`worst_accumulator`). With a symmetric span it is
  A2Q's bound; with one-sided inputs (after a ReLU) each sign's mass bounds one side alone, so a
  channel whose signs balance gets twice A2Q's room — the point of A2Q+'s zero-centred bound, without
  its centring.

A channel fits P bits when the worst case is ≤ 2^(P−1) − 1; `mass_budgets` turns that into the most
mass per sign (one-sided inputs) or in total (two-sided ones) each channel may carry. `fit_budget`
makes every channel meet them: project the real-valued integer-domain weights w/s onto the ℓ1 ball
of the allowed radius — each sign's part onto its own ball when the budget is per sign — (the
sort-based simplex projection of Duchi et al. 2008, vectorised over channels), round to nearest,
and where rounding up in magnitude breaks the bound, round those entries toward zero instead, least
damaging first (AXE-style ℓ1 control).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

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


def input_span(bits: int, zero_point: int) -> tuple[int, int]:
    """(lo, hi) of q_x − z_x for N-bit codes in [0, 2^N − 1] with zero point z."""
    return -int(zero_point), (1 << int(bits)) - 1 - int(zero_point)


def sign_masses(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Σq⁺, Σq⁻) per output channel: the masses of the positive and of the negative integers."""
    q = np.asarray(q).reshape(q.shape[0], -1)
    return np.maximum(q, 0).sum(1).astype(np.float64), np.maximum(-q, 0).sum(1).astype(np.float64)


def reach(pos: np.ndarray, neg: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(largest acc, largest −acc) per channel from its weights alone, over inputs in [lo, hi]:
    Σq⁺·hi + Σq⁻·(−lo) and Σq⁺·(−lo) + Σq⁻·hi."""
    return pos * hi - neg * lo, neg * hi - pos * lo


def worst_from_reach(up: np.ndarray, down: np.ndarray, bias_q: np.ndarray | None = None) -> np.ndarray:
    """Worst |partial sum| of acc per channel, in any order and with the bias anywhere in it, from the
    weights' `reach`: every product's range holds 0, so a partial sum reaches at most `up` or `down`
    plus the bias where it pushes the same way."""
    b = np.zeros(len(up)) if bias_q is None else np.asarray(bias_q, np.float64)
    return np.maximum(up + np.maximum(b, 0.0), down + np.maximum(-b, 0.0))


def worst_accumulator(q: np.ndarray, lo: int, hi: int, bias_q: np.ndarray | None = None) -> np.ndarray:
    """Worst |partial sum of acc| per output channel over every input with q_x − z_x in [lo, hi]
    (`worst_from_reach`): exact for the final sum whenever the bias has a sign's room to spare."""
    return worst_from_reach(*reach(*sign_masses(q), lo, hi), bias_q)


def mass_budgets(bits: int, lo: int, hi: int, bias_q: np.ndarray) -> np.ndarray:
    """(C, 3) per channel: the most Σq⁺, Σq⁻ and Σ|q| it may carry and still fit `bits` (∞: no limit
    of that kind), all ≥ 0. One-sided inputs (lo = 0 or hi = 0) limit each sign's mass alone, to
    ⌊(2^(P−1) − 1 − the bias's push on that side) / X⌋; two-sided ones limit the total to A2Q's
    ℓ1 radius ⌊(2^(P−1) − 1 − |q_b|) / X⌋. Both are sufficient for the exact bound, and both only
    widen as |q_b| shrinks: a coarser step, whose bias code is smaller, keeps the bound."""
    b = np.asarray(bias_q, np.float64)
    top, inf = float(limit(bits)), np.full(b.shape, np.inf)
    if lo == 0 or hi == 0:
        x = max(hi, -lo, 1)
        with_bias = np.floor(np.maximum(top - np.maximum(b, 0.0), 0.0) / x)  # the side the bias pushes up
        against = np.floor(np.maximum(top - np.maximum(-b, 0.0), 0.0) / x)
        # acc's maximum comes from the positive weights if the inputs are ≥ 0, the negative ones if ≤ 0
        pos, neg = (with_bias, against) if lo == 0 else (against, with_bias)
        return np.stack([pos, neg, inf], axis=1)
    total = np.floor(np.maximum(top - np.abs(b), 0.0) / max(hi, -lo))
    return np.stack([inf, inf, total], axis=1)


def exceeds(q: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Per channel, whether integers q (C, K) carry more than `mass_budgets` allows."""
    pos, neg = sign_masses(q)
    return (pos > budget[:, 0]) | (neg > budget[:, 1]) | (pos + neg > budget[:, 2])


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
    """Euclidean projection of each row of v (C, K) onto {‖x‖₁ ≤ radius_c}; rows already inside are kept."""
    x = np.ascontiguousarray(v, np.float64).copy()
    a = np.abs(x)
    for rows, theta, _, _, _ in _projected(x, a, radius):
        x[rows] = np.copysign(np.maximum(a[rows] - theta[:, None], 0.0), x[rows])  # signed zeros included
    return x


def _projected(x: np.ndarray, a: np.ndarray, radius: np.ndarray, order: np.ndarray | None = None
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """For the rows of x (n, K) (magnitudes a, C-contiguous) outside their ℓ1 ball: (rows, their
    projection's threshold θ, each row's m largest magnitudes in descending order, the same entries
    of x, their flat indices into x), a group per prefix length m. The projection of such a row is
    sign·max(|x| − θ, 0).

    The sort-based threshold of Duchi et al. needs a row's magnitudes in descending order only as far
    as its support: the `TOP_FIRST` largest are taken first, and rows whose support reaches past
    them 4× as many, then all. The cumulative sums over the prefix are those of a full sort, so θ is
    the same bits. With `order` (each row's columns by descending magnitude) the prefix is read in
    that order instead of partitioned and sorted: the same values in the same order."""
    todo, m, k = np.flatnonzero(a.sum(1) > radius), TOP_FIRST, a.shape[1]
    while todo.size:
        m = min(m, k)
        if order is not None:
            cols = order[todo, :m]
        elif m == k:
            cols = np.argsort(-a[todo], axis=1, kind="stable")
        else:
            part = np.argpartition(a[todo], k - m, axis=1)[:, k - m:]
            cols = np.take_along_axis(part, np.argsort(-np.take_along_axis(a[todo], part, 1), axis=1, kind="stable"), 1)
        flat = cols + (todo * k)[:, None]
        signed = x.reshape(-1).take(flat)
        top = np.abs(signed)
        theta, wider = _threshold(top, radius[todo])
        done = ~wider | (m == k)
        theta = np.where(radius[todo] > 0, theta, np.inf)  # radius 0: the ball is the origin
        yield todo[done], theta[done], top[done], signed[done], flat[done]
        todo, m = todo[~done], 4 * m


FIT_ELEMENTS = 1 << 21  # weights fitted per batch of rows: 16 MB float64 temporaries stay in the heap
# (rows of v, part "+", "-" or "|") → each row's columns by descending magnitude of its positive part,
# its negative part or its whole: a caller that fits many scalings of the same weights sorts them once
Order = Callable[[np.ndarray, str], np.ndarray]


def scaling_orders(w: np.ndarray) -> Order:
    """The `Order` of rows that are positive scalings of w's channels (C, K), stacked scaling-major
    (row r scales channel r mod C): a positive step and a clip at qmax keep a row's order, so each
    channel's positive part, negative part and magnitudes are sorted once here, for every scaling."""
    orders = {part: np.argsort(-mag, axis=1, kind="stable").astype(np.int32)
              for part, mag in (("+", np.maximum(w, 0.0)), ("-", np.maximum(-w, 0.0)), ("|", np.abs(w)))}
    return lambda rows, part: orders[part][rows % len(w)]


def fit_l1(v: np.ndarray, radius: np.ndarray, qmax: int,
           order: Callable[[int, int], np.ndarray] | None = None) -> np.ndarray:
    """Integers q (C, K) with |q| ≤ qmax and ‖q_c‖₁ ≤ radius_c, close to the real-valued v (C, K).

    Projection, round half away from zero, then the fewest entries that were rounded up in magnitude
    are rounded toward zero — those with the smallest fractional part first (the least extra error;
    the lower column first among equal ones) — until the channel fits. Rounding all of them toward
    zero gives Σ⌊|p|⌋ ≤ ‖p‖₁ ≤ radius, so the bound always holds. Rows are independent and fitted a
    batch at a time. `order(i, j)`: rows i to j's columns by descending magnitude, if known.
    """
    radius = np.floor(np.asarray(radius, np.float64))
    out = np.empty(v.shape, np.int64)
    step = max(1, FIT_ELEMENTS // max(v.shape[1], 1))
    for i in range(0, len(v), step):
        _fit_rows(v[i:i + step], radius[i:i + step], qmax, None if order is None else order(i, min(i + step, len(v))),
                  out[i:i + step])
    return out


def fit_budget(v: np.ndarray, budget: np.ndarray, qmax: int, order: Order | None = None) -> np.ndarray:
    """Integers q (C, K) with |q| ≤ qmax within each channel's `mass_budgets` (C, 3), close to v (C, K):
    `fit_l1` on the total where that is the limit, else on each sign's part alone (the positive and
    the negative part of a row fitted as two rows). Rows are fitted a batch at a time; `order`, if
    given, spares the projection its sorts (`Order`)."""
    out = np.empty(v.shape, np.int64)
    per_sign = np.isfinite(budget[:, 0]) | np.isfinite(budget[:, 1])
    total = np.flatnonzero(~per_sign)
    if total.size:
        out[total] = fit_l1(v[total], budget[total, 2], qmax, None if order is None else lambda i, j: order(total[i:j], "|"))
    split = np.flatnonzero(per_sign)
    step = max(1, FIT_ELEMENTS // max(2 * v.shape[1], 1))  # two rows each: one batch of fit_l1
    for i in range(0, len(split), step):
        r = split[i:i + step]
        x = v[r]
        parts = np.empty((2 * len(r), x.shape[1]))  # the positive parts, then the negative ones
        np.maximum(x, 0.0, out=parts[:len(r)])
        np.maximum(np.negative(x, out=x), 0.0, out=parts[len(r):])
        parts = fit_l1(parts, np.concatenate([budget[r, 0], budget[r, 1]]), qmax,
                       None if order is None else lambda i, j, r=r: _signed_orders(order, r, i, j))
        if r[-1] - r[0] + 1 == len(r):  # consecutive rows (every row of a layer fitted per sign): no gather
            np.subtract(parts[:len(r)], parts[len(r):], out=out[r[0]:r[-1] + 1])
        else:
            out[r] = parts[:len(r)] - parts[len(r):]
    return out


def _signed_orders(order: Order, rows: np.ndarray, i: int, j: int) -> np.ndarray:
    """Orders of rows i to j of the stack [positive parts of `rows`; negative parts of `rows`]: only
    that batch's rows are gathered (fit_l1 asks batch by batch)."""
    n = len(rows)
    return np.concatenate([order(rows[i:min(j, n)], "+"), order(rows[max(i - n, 0):max(j - n, 0)], "-")])


def _fit_rows(v: np.ndarray, radius: np.ndarray, qmax: int, order: np.ndarray | None, out: np.ndarray) -> None:
    """`fit_l1` of a batch of rows, written into `out` (C-contiguous int64). A projected row's integers
    are nonzero only on its support (the magnitudes above θ, a prefix of its sorted columns): they are
    rounded there alone, a few dozen columns of thousands under a tight budget, the rest left zero."""
    x = np.clip(v, -qmax, qmax)
    a = np.abs(x)
    out.fill(0)
    inside = np.ones(len(x), bool)
    for rows, theta, top, signed, flat in _projected(x, a, radius, order):
        inside[rows] = False
        # the support ends inside the prefix (descending: every later magnitude is ≤ θ)
        fits = (top[:, -1] <= theta) | (top.shape[1] == x.shape[1])
        mag = _round_within(np.maximum(top[fits] - theta[fits, None], 0.0), radius[rows[fits]], flat[fits])
        out.reshape(-1)[flat[fits]] = np.copysign(mag, signed[fits])
        r = rows[~fits]  # a support a last bit past the prefix: the whole row
        out[r] = np.copysign(_round_within(np.maximum(a[r] - theta[~fits, None], 0.0), radius[r]), x[r])
    r = np.flatnonzero(inside)
    out[r] = np.copysign(_round_within(a[r], radius[r]), x[r])


def _round_within(mag: np.ndarray, radius: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
    """Magnitudes (n, m) ≥ 0 rounded half up, then the fewest rounded-up entries rounded down again —
    the smallest fractional parts first, the lower column among equal ones — until each row's sum is
    within its radius. `cols`: numbers in the entries' column order, per row (default: their
    positions). Works in place on mag."""
    frac = mag.copy()
    np.floor(mag, out=mag)
    frac -= mag
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
        need = e - down.sum(1)
        place = np.cumsum(ties, axis=1)
        if cols is not None:
            _rank_by_column(place, ties, cols[rows], need)
        down |= ties & (place <= need[:, None])
        mag[rows] -= down
    return mag


def _rank_by_column(place: np.ndarray, ties: np.ndarray, cols: np.ndarray, need: np.ndarray) -> None:
    """Where a row has more tied entries than it rounds down, rank them by column (1 for the lowest)
    in `place` instead of by position: the positions are a magnitude order, the rule is by column."""
    some = np.flatnonzero(ties.sum(1) > need)
    if some.size == 0:
        return
    by_col = np.where(ties[some], cols[some], np.iinfo(cols.dtype).max)
    ranks = np.empty(by_col.shape, np.int64)
    np.put_along_axis(ranks, np.argsort(by_col, axis=1, kind="stable"), np.arange(1, by_col.shape[1] + 1)[None], 1)
    place[some] = ranks


__all__ = ["limit", "bits_for", "datatype_bound", "input_span", "sign_masses", "reach", "worst_from_reach",
           "worst_accumulator", "mass_budgets", "exceeds", "project_l1", "fit_l1", "fit_budget", "Order", "scaling_orders"]
