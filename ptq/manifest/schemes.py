"""Every weight scheme's rules: what a manifest's `weight` record of each scheme must satisfy, and
how a real value is put on the scheme's grid.

A scheme is a set of representable values per weight (uniform: the narrow symmetric grid, with an
optional bit-plane window; multipoint: a sum of points, each on its own grid; swis: per group of
weights, a shared set of bit positions). The checks run on every load, so whether a manifest
validates never depends on which quantization method is installed or imported. How a real value is
put on a scheme's grid lives in `ptq.ir.grids`, shared with the methods' rounding engine.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .. import bitserial
from ..intmath import qmax
from .fields import fail, in_range, need, tensor
from .format import Manifest


def point_bits(w: dict) -> list[int]:
    """Each term's width of a manifest weight record: multipoint's `point_bits`, else (other schemes,
    and multipoint manifests written before extra_bits) `bits` for every term."""
    return w.get("point_bits") or [w["bits"]] * len(w["terms"])


def check_uniform(m: Manifest, w: dict, where: str) -> None:
    if len(w["terms"]) != 1:
        raise fail(f"{where}.terms", "a uniform weight has exactly one term")
    if "bitplanes" in w:
        check_bitplanes(need(w, "bitplanes", dict, where), w["bits"], f"{where}.bitplanes")


def check_bitplanes(bp: dict, bits: int, where: str) -> None:
    """The bit-plane record must describe the stored grid: `bits − 1` kept magnitude planes."""
    kept = need(bp, "kept_planes", list, where)
    if len(kept) != 2 or not all(type(v) is int for v in kept) or not 0 <= kept[0] <= kept[1] + 1 \
            or kept[1] - kept[0] + 2 != bits:
        raise fail(f"{where}.kept_planes", f"must be [lowest, highest] plane of the {bits - 1} kept magnitude planes, got {kept!r}")
    dens = need(bp, "density", list, where)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in dens):
        raise fail(f"{where}.density", "must be fractions in [0, 1], one per plane")


def check_multipoint(m, w: dict, where: str) -> None:
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
    pb = point_bits(w)
    if not isinstance(pb, list) or len(pb) != points or not all(type(b) is int and 2 <= b <= w["bits"] for b in pb) \
            or (pb and pb[0] != w["bits"]):
        raise fail(f"{where}.point_bits", f"must list {points} widths in 2..{w['bits']}, the first equal to bits, got {pb!r}")
    for j, (t, b) in enumerate(zip(terms, pb)):
        in_range(m.tensor(t["q"]), -qmax(b), qmax(b), f"{where}.terms[{j}].q")
    bpw = need(w, "bits_per_weight", (int, float), where)
    want = sum(b * float(np.mean(n > j)) for j, b in enumerate(pb))
    if abs(bpw - want) > 1e-6:
        raise fail(f"{where}.bits_per_weight", f"is {bpw:g}, expected Σ point bits × share of channels with that point = {want:g}")
    for j, t in enumerate(terms[1:], start=1):
        q = m.tensor(t["q"]).reshape(c, -1)
        if np.any(q[n <= j] != 0):
            raise fail(f"{where}.terms[{j}].q", f"is non-zero on channels with at most {j} points")


SCHEDULE_KEYS = ("cycles", "cycles_unsorted", "dense_cycles", "baseline_cycles")


def check_swis(m, w: dict, where: str) -> None:
    """Shapes of the group tensors, every weight representable by its group's set, the schedule's cycles."""
    bits = w["bits"]
    if len(w["terms"]) != 1:
        raise fail(f"{where}.terms", "a swis weight has exactly one term")
    g = need(w, "group", int, where)
    if g < 1:
        raise fail(f"{where}.group", f"must be positive, got {g}")
    n = need(w, "shared_bits", int, where)
    if not 1 <= n <= bits - 1:
        raise fail(f"{where}.shared_bits", f"must be 1..{bits - 1} (bits − 1), got {n}")
    lanes = need(w, "lanes", int, where)
    if lanes < 1:
        raise fail(f"{where}.lanes", f"must be positive, got {lanes}")
    shape = w["shape"]
    c, k = shape[0], int(np.prod(shape[1:]))
    ng = -(-k // g)
    extra = need(w, "extra", dict, where)
    shifts = tensor(m, extra.get("shifts"), f"{where}.extra.shifts", "int", (c, ng)).astype(np.int64)
    if shifts.size and (shifts.min() < 0 or shifts.max() >= 1 << (bits - 1)):
        raise fail(f"{where}.extra.shifts", f"bitmasks must lie in [0, 2^{bits - 1}), got {int(shifts.min())}..{int(shifts.max())}")
    pc = bitserial.popcount(shifts)
    if pc.size and pc.max() > n:
        ci, gi = np.unravel_index(int(pc.argmax()), pc.shape)
        raise fail(f"{where}.extra.shifts", f"group ({ci}, {gi}) has {int(pc.max())} positions, more than shared_bits = {n}")
    q = m.tensor(w["terms"][0]["q"]).reshape(c, -1)
    bad = bitserial.unrepresentable(q, shifts, g)
    if bad.any():
        ci, gi, j = (int(v) for v in np.argwhere(bad)[0])
        kk = gi * g + j
        raise fail(f"{where}.terms[0].q", f"weight [{ci}, {kk}] = {int(q[ci, kk])} is not representable by its group's "
                                          f"shift set {int(shifts[ci, gi]):#b} (extra.shifts[{ci}, {gi}]); "
                                          f"{int(bad.sum())} weight(s) are not")
    order = tensor(m, extra.get("order"), f"{where}.extra.order", "int", (c * ng,)).astype(np.int64)
    if not np.array_equal(np.sort(order), np.arange(c * ng)):
        raise fail(f"{where}.extra.order", f"must be a permutation of the {c * ng} groups")
    pos = need(w, "out_positions", int, where)
    summary, _ = bitserial.layer_schedule(q, g, lanes, n, bits, pos, order)
    for key in SCHEDULE_KEYS:
        got = need(w, key, int, where)
        if got != summary[key]:
            raise fail(f"{where}.{key}", f"is {got} but the weights and schedule give {summary[key]}")
    bpw = need(w, "bits_per_weight", (int, float), where)
    want = bitserial.storage_bits(bits, n, g)
    if abs(bpw - want) > 1e-9:
        raise fail(f"{where}.bits_per_weight", f"is {bpw:g}, expected 1 + N + N·⌈log2(bits−1)⌉/group = {want:g}")


SCHEMES: dict[str, Callable[[Manifest, dict, str], None]] = {
    "uniform": check_uniform, "multipoint": check_multipoint, "swis": check_swis,
}
