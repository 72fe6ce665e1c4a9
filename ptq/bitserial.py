"""Bit-serial cycle model of SWIS weights: shared bit positions, zero skipping, lock-stepped lanes.

Pure numpy on integer weights, no torch: the method (ptq/methods/swis.py), the manifest validator
and the simulator report all count cycles with these functions, and the method and the manifest
builder map values onto a group's shift set with the same tables, so they agree by construction.

The machine (ours; the paper's exact scheme is unavailable, docs/ALGORITHMS.md "swis"):
- A **group** is G consecutive weights of one output channel along the reduction axis K (the last
  group of a channel is padded with zeros). Its G multipliers share control: per cycle they all
  add (or subtract, by each weight's sign) their input shifted by the same bit position.
- A group therefore takes one cycle per magnitude bit position that at least one of its weights
  uses — at most N, the size of its shared set — and 0 cycles when all its weights are zero.
- `lanes` such groups run in lock step: a step issues one group to every lane and lasts as long as
  the slowest group in it. For every output position (pixel, or one row for a linear layer) all
  C·⌈K/G⌉ groups of the layer are processed, so a layer's cycles are
  positions × Σ_steps max(cycles of the groups in the step).
- The schedule sorts the groups by cycles (descending) before cutting them into steps, so groups
  of equal length share a step and the lanes finish together; the natural (channel-major) order
  is reported too, to show what the sort buys.

Reference points, per layer and per output position, with n = C·⌈K/G⌉ groups and ⌈n/lanes⌉ steps:
- **baseline**: conventional bit-serial b₀-bit two's-complement weights, every group b₀ cycles
  (one per bit plane, sign plane included, no skipping): ⌈n/lanes⌉·b₀;
- **dense**: N cycles for every group (SWIS without skipping, which is also the cost of
  truncation to the N most significant bits): ⌈n/lanes⌉·N.
"""
from __future__ import annotations

from math import ceil
from typing import Any

import numpy as np

_POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def popcount(a: np.ndarray) -> np.ndarray:
    """Number of set bits of non-negative integers below 2^32, elementwise (int64)."""
    a = np.asarray(a).astype(np.int64)
    out = np.zeros(a.shape, np.int64)
    for shift in (0, 8, 16, 24):
        out += _POP8[(a >> shift) & 0xFF]
    return out


def grouped(q: np.ndarray, group: int) -> np.ndarray:
    """(C, ...) integer weights → (C, ⌈K/G⌉, G) magnitudes, zero padded along K."""
    c = q.shape[0]
    m = np.abs(np.asarray(q).reshape(c, -1).astype(np.int64))
    k = m.shape[1]
    pad = (-k) % group
    if pad:
        m = np.concatenate([m, np.zeros((c, pad), np.int64)], axis=1)
    return m.reshape(c, -1, group)


def used_positions(q: np.ndarray, group: int) -> np.ndarray:
    """(C, ngroups) bitmask of the magnitude bit positions each group's weights use."""
    return np.bitwise_or.reduce(grouped(q, group), axis=2)


def group_cycles(q: np.ndarray, group: int) -> np.ndarray:
    """(C, ngroups) cycles of every group: one per used position (zero skipping)."""
    return popcount(used_positions(q, group))


def unrepresentable(q: np.ndarray, shifts: np.ndarray, group: int) -> np.ndarray:
    """(C, ngroups, G) True where a weight's magnitude has a bit outside its group's shift set."""
    return (grouped(q, group) & ~np.asarray(shifts, np.int64)[..., None]) != 0


def nearest_tables(masks: np.ndarray, magnitude_bits: int) -> np.ndarray:
    """(S, 2^(mb+1)) table: for the half-unit cell t = ⌊2x⌋ of a magnitude x, the nearest value set S represents.

    The midpoints between integers are integers or half-integers, so every x in a cell has the same
    nearest representable value, that of the cell's centre (t + ½)/2; exact ties go up (round half up).
    """
    values = np.arange(1 << magnitude_bits, dtype=np.int64)
    ok = (values[None, :] & ~masks[:, None]) == 0  # (S, V)
    centres = (np.arange(2 << magnitude_bits) + 0.5) / 2.0
    dist = np.abs(centres[None, None, :] - values[None, :, None]) + np.where(ok, 0.0, np.inf)[:, :, None]
    return values[dist.argmin(axis=1)]  # (S, T)


def neighbour_tables(masks: np.ndarray, magnitude_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, 2^(mb+1)) tables (down, up): for f = ⌊x⌋ in [−2^mb, 2^mb − 1] (index f + 2^mb), the largest
    signed value set S represents at or below x and the smallest above it; beyond the set's ends
    both are its end value. Representable values are integers, so ⌊x⌋ decides both."""
    values = np.arange(1 << magnitude_bits, dtype=np.int64)
    ok = (values[None, :] & ~masks[:, None]) == 0  # (S, V)
    signed = np.concatenate([-values[::-1], values])
    ok = np.concatenate([ok[:, ::-1], ok], axis=1)[:, None, :]  # (S, 1, 2V)
    f = np.arange(-(1 << magnitude_bits), 1 << magnitude_bits)[None, :, None]
    below = np.where(ok & (signed <= f), signed, np.iinfo(np.int64).min).max(-1)
    above = np.where(ok & (signed > f), signed, np.iinfo(np.int64).max).min(-1)
    none_below, none_above = below == np.iinfo(np.int64).min, above == np.iinfo(np.int64).max
    return np.where(none_below, above, below), np.where(none_above, below, above)


def lockstep_cycles(cycles: np.ndarray, lanes: int) -> int:
    """Cycles of groups issued in the given order to `lanes` lock-stepped lanes (steps of `lanes`)."""
    c = np.asarray(cycles, np.int64).ravel()
    pad = (-c.size) % lanes
    if pad:
        c = np.concatenate([c, np.zeros(pad, np.int64)])
    return int(c.reshape(-1, lanes).max(axis=1).sum()) if c.size else 0


def schedule_order(cycles: np.ndarray) -> np.ndarray:
    """Issue order of the groups (flat indices into (C, ngroups)): longest first, stable."""
    return np.argsort(-np.asarray(cycles, np.int64).ravel(), kind="stable")


def layer_schedule(q: np.ndarray, group: int, lanes: int, shared_bits: int, bits: int,
                   out_positions: int = 1, order: np.ndarray | None = None) -> tuple[dict[str, Any], np.ndarray]:
    """A layer's schedule summary (scalar fields, cycles per sample) and its group issue order.

    `out_positions` is the number of output positions one sample computes (H_out·W_out of a conv,
    1 for a linear layer); every count below is per sample, i.e. per position × `out_positions`.
    `order` replays a given issue order (e.g. a manifest's) instead of sorting.
    """
    cyc = group_cycles(q, group)
    order = schedule_order(cyc) if order is None else np.asarray(order, np.int64)
    n = int(cyc.size)
    steps = ceil(n / lanes)
    flat = cyc.ravel()
    summary = {
        "lanes": int(lanes),
        "out_positions": int(out_positions),
        "cycles": lockstep_cycles(flat[order], lanes) * out_positions,
        "cycles_unsorted": lockstep_cycles(flat, lanes) * out_positions,
        "dense_cycles": steps * int(shared_bits) * out_positions,
        "baseline_cycles": steps * int(bits) * out_positions,
        "mean_group_cycles": float(flat.mean()) if n else 0.0,
    }
    return summary, order


def storage_bits(bits: int, shared_bits: int, group: int) -> float:
    """Effective storage bits per weight: sign + N mask bits + the group's N shift amounts.

    Each shift amount names one of the b₀−1 magnitude positions (⌈log2(b₀−1)⌉ bits) and is shared
    by G weights. With N = b₀−1 the set is every position, so no shifts are stored (plain b₀ bits).
    """
    if shared_bits >= bits - 1:
        return float(bits)
    return 1.0 + shared_bits + shared_bits * ceil(np.log2(bits - 1)) / group


def totals(layers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Sum of per-layer schedule summaries (cycles per sample) and the ratios a report shows."""
    keys = ("cycles", "cycles_unsorted", "dense_cycles", "baseline_cycles")
    out: dict[str, Any] = {k: int(sum(v.get(k, 0) for v in layers.values())) for k in keys}
    base = max(out["baseline_cycles"], 1)
    out["cycles_vs_baseline"] = out["cycles"] / base
    out["dense_vs_baseline"] = out["dense_cycles"] / base
    out["speedup_vs_baseline"] = out["baseline_cycles"] / max(out["cycles"], 1)
    return out


__all__ = ["grouped", "group_cycles", "layer_schedule", "lockstep_cycles", "nearest_tables",
           "popcount", "schedule_order", "storage_bits", "totals", "unrepresentable", "used_positions"]
