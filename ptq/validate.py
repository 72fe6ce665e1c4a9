"""Structural validation of a loaded manifest (verification level 1 checks included).

Every failure is one ManifestError naming the field, so a corrupt or hand-edited manifest is
refused before any back end runs it.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .errors import ManifestError, PtqError
from .manifest import OP_KINDS, Manifest

ARITY = {"conv": 1, "linear": 1, "add": 2, "avgpool": 1, "lut": 1, "maxpool": 1, "clamp": 1, "reshape": 1, "pad": 1}
SCHEME_CHECKS: dict[str, Callable[[Manifest, dict, str], None]] = {}


def scheme_check(name: str):
    """Register the extra checks of a weight scheme (uniform, multipoint, swis, ...)."""
    def deco(fn):
        SCHEME_CHECKS[name] = fn
        return fn
    return deco


def fail(where: str, msg: str) -> ManifestError:
    return ManifestError(f"manifest field '{where}': {msg}")


def need(obj: Any, key: str, kind: type | tuple, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise fail(f"{where}.{key}", "is missing")
    v = obj[key]
    if not isinstance(v, kind) or (isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise fail(f"{where}.{key}", f"must be {kind}, got {type(v).__name__}")
    return v


def tensor(m: Manifest, ref: Any, where: str, dtype_kind: str | None = None, shape: tuple | None = None) -> np.ndarray:
    if not isinstance(ref, str):
        raise fail(where, "must be a tensor reference (string)")
    if ref not in m.tensors:
        raise fail(where, f"refers to tensor '{ref}', which is not in the tensor file")
    a = m.tensors[ref]
    if dtype_kind == "int" and not np.issubdtype(a.dtype, np.integer):
        raise fail(where, f"tensor '{ref}' must be integer, is {a.dtype}")
    if dtype_kind == "float" and not np.issubdtype(a.dtype, np.floating):
        raise fail(where, f"tensor '{ref}' must be floating point, is {a.dtype}")
    if dtype_kind == "float" and not np.all(np.isfinite(a)):
        raise fail(where, f"tensor '{ref}' contains NaN or Inf")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise fail(where, f"tensor '{ref}' has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def in_range(a: np.ndarray, lo: int, hi: int, where: str) -> None:
    if a.size and (a.min() < lo or a.max() > hi):
        raise fail(where, f"values {int(a.min())}..{int(a.max())} fall outside [{lo}, {hi}]")


@scheme_check("uniform")
def _uniform(m: Manifest, w: dict, where: str) -> None:
    if len(w["terms"]) != 1:
        raise fail(f"{where}.terms", "a uniform weight has exactly one term")
    if "bitplanes" in w:
        _bitplanes(need(w, "bitplanes", dict, where), w["bits"], f"{where}.bitplanes")


def _bitplanes(bp: dict, bits: int, where: str) -> None:
    """The bit-plane record must describe the stored grid: `bits − 1` kept magnitude planes."""
    kept = need(bp, "kept_planes", list, where)
    if len(kept) != 2 or not all(type(v) is int for v in kept) or not 0 <= kept[0] <= kept[1] + 1 \
            or kept[1] - kept[0] + 2 != bits:
        raise fail(f"{where}.kept_planes", f"must be [lowest, highest] plane of the {bits - 1} kept magnitude planes, got {kept!r}")
    dens = need(bp, "density", list, where)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in dens):
        raise fail(f"{where}.density", "must be fractions in [0, 1], one per plane")


def validate(m: Manifest, stored: bool = True) -> None:
    """Every check of the manifest; `stored=False` for one not yet saved (no tensor-file entries yet)."""
    d = m.data
    if stored:
        entries = need(need(d, "tensors", dict, ""), "entries", dict, "tensors")
        for ref, a in m.tensors.items():
            e = entries.get(ref)
            if not isinstance(e, dict) or e.get("dtype") != str(a.dtype) or e.get("shape") != list(a.shape):
                raise fail(f"tensors.entries.{ref}", "does not match the tensor file (dtype or shape)")
    g = need(d, "graph", dict, "")
    need(g, "input", str, "graph")
    need(g, "input_shape", list, "graph")
    need(g, "outputs", list, "graph")
    encs = need(g, "encodings", dict, "graph")
    ops = need(g, "ops", list, "graph")
    for t, e in encs.items():
        w = f"graph.encodings.{t}"
        bits = need(e, "bits", int, w)
        if not 2 <= bits <= 16:
            raise fail(f"{w}.bits", f"must be 2..16, got {bits}")
        s = need(e, "scale", (int, float), w)
        if not (math.isfinite(s) and s > 0):
            raise fail(f"{w}.scale", f"must be positive and finite, got {s}")
        z = need(e, "zero_point", int, w)
        if not 0 <= z <= (1 << bits) - 1:
            raise fail(f"{w}.zero_point", f"must be in [0, {(1 << bits) - 1}], got {z}")
    known = {g["input"]}
    if g["input"] not in encs:
        raise fail("graph.encodings", f"has no encoding for the input tensor '{g['input']}'")
    names = set()
    for i, op in enumerate(ops):
        w = f"graph.ops[{i}]"
        name = need(op, "name", str, w)
        if name in names:
            raise fail(f"{w}.name", f"duplicate op name '{name}'")
        names.add(name)
        kind = need(op, "kind", str, w)
        if kind not in OP_KINDS:
            raise fail(f"{w}.kind", f"unknown op kind '{kind}'")
        inputs = need(op, "inputs", list, w)
        if len(inputs) != ARITY.get(kind, len(inputs)) or not inputs or not all(isinstance(t, str) for t in inputs):
            raise fail(f"{w}.inputs", f"a {kind} op takes {ARITY.get(kind, 'one or more')} tensor name(s), got {inputs!r}")
        for t in inputs:
            if t not in known:
                raise fail(f"{w}.inputs", f"tensor '{t}' is used before it is produced")
        out = need(op, "output", str, w)
        if out not in encs:
            raise fail("graph.encodings", f"has no encoding for tensor '{out}'")
        need(op, "attrs", dict, w)
        _check_op(m, op, w)
        known.add(out)
    if not g["outputs"] or not all(isinstance(t, str) for t in g["outputs"]):
        raise fail("graph.outputs", f"must name at least one output tensor, got {g['outputs']!r}")
    for t in g["outputs"]:
        if t not in known:
            raise fail("graph.outputs", f"tensor '{t}' is not produced by any op")
    shape = g["input_shape"]
    if not shape or not all(type(v) is int and 1 <= v <= 1 << 16 for v in shape) or math.prod(shape) > 1 << 26:
        raise fail("graph.input_shape", f"must be positive integers (at most 2^26 values), got {shape}")
    dry_run(m)


SPATIAL = ("kernel", "stride", "padding", "dilation", "pads")


def dry_run(m: Manifest) -> None:
    """Run the integer graph once on a zero input, so attributes the executors read (strides,
    paddings, shapes, ...) that are missing, mistyped or inconsistent are refused here, naming the
    op, instead of crashing or silently changing shapes later. Spatial attributes are bounded by
    twice the op's input size (+16) first, so a corrupt one cannot make an op allocate without limit."""
    import torch

    from .graph import execute
    from .simulator import Simulator

    def guard(fn):
        def run(op, xs):
            where = f"graph.ops[{op.name}].attrs"
            size = 2 * max(max(x.shape[2:] if x.dim() == 4 else x.shape[1:], default=1) for x in xs) + 16
            for k in SPATIAL:
                v = op.attrs.get(k)
                if v is not None and (not isinstance(v, list) or not all(type(i) is int and 0 <= i <= size for i in v)):
                    raise fail(f"{where}.{k}", f"must be a list of integers in [0, {size}], got {v!r}")
            try:
                y = fn(op, xs)
            except PtqError:
                raise
            except Exception as exc:  # any executor failure here means an inconsistent manifest
                raise fail(where, f"op '{op.name}' cannot be executed: {type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]}") from None
            want = op.attrs.get("out_shape")
            if want is not None and list(y.shape[1:]) != want:
                raise fail(f"{where}.out_shape", f"op '{op.name}' produces shape {list(y.shape[1:])}, the manifest says {want!r}")
            return y
        return run

    try:
        sim = Simulator(m)
        kernels = {k: guard(f) for k, f in sim.kernels().items()}
        x = sim.quantize_input(torch.zeros((1, *m.graph["input_shape"])))
    except PtqError:
        raise
    except Exception as exc:
        raise fail("graph", f"cannot be prepared for execution: {type(exc).__name__}: {exc}") from None
    with torch.no_grad():
        execute(sim.graph, x, kernels)


def _check_dyadic(mult: np.ndarray, shift: np.ndarray, ratios: np.ndarray, where: str) -> None:
    """Requantizers are derived from the encodings' scales (m = round(M·2^n)); a multiplier, shift or
    scale edited on its own no longer agrees, and would silently compute a different model."""
    err = np.abs(mult.astype(np.float64) - ratios * np.exp2(shift.astype(np.float64)))
    if err.size and err.max() > 0.5 + 1e-6:
        raise fail(where, "multiplier/shift do not match the scales of the encodings and weights "
                          "(edited by hand?); re-run ptq quantize")


def _qmax(m: Manifest, t: str) -> int:
    return (1 << m.encoding(t)["bits"]) - 1


def _check_clamp(m: Manifest, op: dict, w: str) -> None:
    c = need(op, "clamp", list, w)
    hi = _qmax(m, op["output"])
    if len(c) != 2 or not all(type(v) is int for v in c) or not 0 <= c[0] <= c[1] <= hi:
        raise fail(f"{w}.clamp", f"must be two integers 0 <= lo <= hi <= {hi}, got {c}")


def _check_op(m: Manifest, op: dict, w: str) -> None:
    kind = op["kind"]
    if kind in ("conv", "linear"):
        wt = need(op, "weight", dict, w)
        scheme = need(wt, "scheme", str, f"{w}.weight")
        if scheme not in SCHEME_CHECKS:
            raise fail(f"{w}.weight.scheme", f"unknown weight scheme '{scheme}'")
        shape = tuple(need(wt, "shape", list, f"{w}.weight"))
        if not shape or not all(type(v) is int and v > 0 for v in shape):
            raise fail(f"{w}.weight.shape", f"must be positive integers, got {list(shape)}")
        bits = need(wt, "bits", int, f"{w}.weight")
        if not 2 <= bits <= 8:
            raise fail(f"{w}.weight.bits", f"must be 2..8, got {bits}")
        terms = need(wt, "terms", list, f"{w}.weight")
        if not terms:
            raise fail(f"{w}.weight.terms", "is empty")
        c = shape[0]
        lim = (1 << (bits - 1)) - 1
        for j, t in enumerate(terms):
            q = tensor(m, t.get("q") if isinstance(t, dict) else None, f"{w}.weight.terms[{j}].q", "int", shape)
            in_range(q, -lim, lim, f"{w}.weight.terms[{j}].q")
            s = tensor(m, t.get("scale"), f"{w}.weight.terms[{j}].scale", "float", (c,))
            if np.any(s <= 0):
                raise fail(f"{w}.weight.terms[{j}].scale", "must be positive")
        SCHEME_CHECKS[scheme](m, wt, f"{w}.weight")
        b = need(op, "bias", dict, w)
        bq = tensor(m, b.get("q"), f"{w}.bias.q", "int", (c,))
        in_range(bq, -(2**31 - 1), 2**31 - 1, f"{w}.bias.q")
        tensor(m, b.get("float"), f"{w}.bias.float", "float", (c,))
        r = need(op, "requant", dict, w)
        mult = tensor(m, r.get("multiplier"), f"{w}.requant.multiplier", "int", (len(terms), c))
        in_range(mult, 0, 2**31 - 1, f"{w}.requant.multiplier")
        sh = tensor(m, r.get("shift"), f"{w}.requant.shift", "int", (c,))
        in_range(sh, 1, 62, f"{w}.requant.shift")
        _check_clamp(m, op, w)
        s_x, s_y = m.encoding(op["inputs"][0])["scale"], m.encoding(op["output"])["scale"]
        ratios = np.stack([s_x * m.tensors[t["scale"]].astype(np.float64) / s_y for t in terms])
        _check_dyadic(mult, sh[None, :], ratios, f"{w}.requant")
        acc = need(op, "accumulator", dict, w)
        p = need(acc, "bits", int, f"{w}.accumulator")
        if not 8 <= p <= 32:
            raise fail(f"{w}.accumulator.bits", f"must be 8..32, got {p}")
    elif kind in ("add", "concat", "avgpool"):
        r = need(op, "requant", dict, w)
        mult = need(r, "multiplier", list, f"{w}.requant")
        n_in = 1 if kind == "avgpool" else len(op["inputs"])
        if len(mult) != n_in or not all(isinstance(v, int) and 0 <= v < 2**31 for v in mult):
            raise fail(f"{w}.requant.multiplier", f"must be {n_in} integers in [0, 2^31)")
        sh = need(r, "shift", int, f"{w}.requant")
        if not 1 <= sh <= 62:
            raise fail(f"{w}.requant.shift", f"must be 1..62, got {sh}")
        if kind == "avgpool" and (need(r, "count", int, f"{w}.requant") < 1):
            raise fail(f"{w}.requant.count", "must be positive")
        count = r["count"] if kind == "avgpool" else 1
        s_y = m.encoding(op["output"])["scale"]
        ratios = np.array([m.encoding(t)["scale"] / (s_y * count) for t in op["inputs"]])
        _check_dyadic(np.array(mult), np.array([sh]), ratios, f"{w}.requant")
        _check_clamp(m, op, w)
    elif kind == "lut":
        n = 1 << m.encoding(op["inputs"][0])["bits"]
        t = tensor(m, op.get("table"), f"{w}.table", "int", (n,))
        in_range(t, 0, _qmax(m, op["output"]), f"{w}.table")
    elif kind == "clamp":
        _check_clamp(m, op, w)
    elif kind in ("pad", "maxpool"):
        v = need(op, "pad_value", int, w)
        if not 0 <= v <= _qmax(m, op["output"]):
            raise fail(f"{w}.pad_value", f"must be a code of the output encoding, got {v}")
