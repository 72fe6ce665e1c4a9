"""Structural validation of a loaded manifest (verification level 1 checks included).

Every failure is one ManifestError naming the field, so a corrupt or hand-edited manifest is
refused before any back end runs it.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..errors import ManifestError, PtqError
from ..intmath import qmax
from ..ir import OP_TABLE, require_all
from .fields import fail, in_range, need, tensor
from .format import Manifest
from .header import check_header, check_layer_records
from .schemes import SCHEMES

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
        if kind not in OP_TABLE:
            raise fail(f"{w}.kind", f"unknown op kind '{kind}'")
        spec = OP_TABLE[kind]
        inputs = need(op, "inputs", list, w)
        arity = spec.arity if spec.arity is not None else len(inputs)
        if len(inputs) != arity or not inputs or not all(isinstance(t, str) for t in inputs):
            raise fail(f"{w}.inputs", f"a {kind} op takes {spec.arity or 'one or more'} tensor name(s), got {inputs!r}")
        for t in inputs:
            if t not in known:
                raise fail(f"{w}.inputs", f"tensor '{t}' is used before it is produced")
        out = need(op, "output", str, w)
        if out not in encs:
            raise fail("graph.encodings", f"has no encoding for tensor '{out}'")
        need(op, "attrs", dict, w)
        for f in spec.record:
            if f not in op:
                raise fail(f"{w}.{f}", "is missing")
        CHECKS[kind](m, op, w)
        known.add(out)
    if not g["outputs"] or not all(isinstance(t, str) for t in g["outputs"]):
        raise fail("graph.outputs", f"must name at least one output tensor, got {g['outputs']!r}")
    for t in g["outputs"]:
        if t not in known:
            raise fail("graph.outputs", f"tensor '{t}' is not produced by any op")
    shape = g["input_shape"]
    if not shape or not all(type(v) is int and 1 <= v <= 1 << 16 for v in shape) or math.prod(shape) > 1 << 26:
        raise fail("graph.input_shape", f"must be positive integers (at most 2^26 values), got {shape}")
    check_header(d)
    dry_run(m)


SPATIAL = ("kernel", "stride", "padding", "dilation", "pads")
PAIRS = ("kernel", "stride", "padding", "dilation")


def _shape_kernels(m: Manifest) -> dict[str, Callable]:
    """The float semantics of every op kind on torch's meta device: shapes only, no arithmetic."""
    import torch
    import torch.nn.functional as F

    from ..ir.floatops import maxpool, pad, permute, pool_sum, reshape, slice_

    def weighted(op, xs):
        w = torch.empty(op.record["weight"]["shape"], device="meta")
        if op.kind == "linear":
            return F.linear(xs[0], w)
        a = op.attrs
        return F.conv2d(xs[0], w, None, a["stride"], a["padding"], a["dilation"], a["groups"])

    def avgpool(op, xs):
        s, count = pool_sum(op, xs[0])
        if count != op.record["requant"]["count"]:
            raise fail(f"graph.ops[{op.name}].requant.count",
                       f"pooling window {count} differs from the manifest's {op.record['requant']['count']}")
        return s

    def layernorm(op, xs):
        d = xs[0].shape[-1]
        for k in ("multiplier", "shift", "bias", "gamma", "beta"):
            tensor(m, op.record["norm"][k], f"graph.ops[{op.name}].norm.{k}", "float" if k in ("gamma", "beta") else "int", (d,))
        return xs[0].clone()

    def offset(op, xs):
        y = pad(op, xs[0], 0.0)
        tensor(m, op.record["offset"], f"graph.ops[{op.name}].offset", "int", tuple(y.shape[1:]))
        return y

    def embedding(op, xs):
        r, d = op.record["embedding"], op.attrs["out_shape"][-1]
        rows = tensor(m, r["table"], f"graph.ops[{op.name}].embedding.table", "int", None)
        if rows.ndim != 2 or rows.shape[1] != d:
            raise fail(f"graph.ops[{op.name}].embedding.table", f"must be (rows, {d}), got {list(rows.shape)}")
        tensor(m, r["offset"], f"graph.ops[{op.name}].embedding.offset", "int", (*xs[0].shape[1:], d))
        return torch.empty((*xs[0].shape, d), device="meta")

    return require_all("shape", {
        "conv": weighted, "linear": weighted, "add": lambda op, xs: xs[0] + xs[1], "avgpool": avgpool,
        "concat": lambda op, xs: torch.cat(xs, dim=op.attrs["dim"]), "lut": lambda op, xs: xs[0].clone(),
        "maxpool": lambda op, xs: maxpool(op, xs[0], 0.0), "clamp": lambda op, xs: xs[0],
        "reshape": lambda op, xs: reshape(op, xs[0]), "pad": lambda op, xs: pad(op, xs[0], 0.0),
        "matmul": lambda op, xs: torch.matmul(xs[0], xs[1]), "scale": lambda op, xs: xs[0].clone(),
        "layernorm": layernorm, "softmax": lambda op, xs: (xs[0] + xs[1]) if len(xs) == 2 else xs[0].clone(),
        "embedding": embedding, "offset": offset,
        "permute": lambda op, xs: permute(op, xs[0]), "slice": lambda op, xs: slice_(op, xs[0]),
    })


def dry_run(m: Manifest) -> None:
    """Run the graph's shapes once (torch's meta device: no data, no arithmetic), so attributes the
    executors read (strides, paddings, groups, shapes, ...) that are missing, mistyped or
    inconsistent are refused here, naming the op, instead of crashing or silently changing shapes
    later. Spatial attributes are bounded by twice the op's input size (+16) first, so a corrupt
    one cannot make an op allocate without limit."""
    import torch

    from ..ir import Graph, Op, execute

    def guard(fn):
        def run(op, xs):
            where = f"graph.ops[{op.name}].attrs"
            size = 2 * max(max(x.shape[2:] if x.dim() == 4 else x.shape[1:], default=1) for x in xs) + 16
            for k in SPATIAL:
                v = op.attrs.get(k)
                if v is not None and (not isinstance(v, list) or not all(type(i) is int and 0 <= i <= size for i in v)):
                    raise fail(f"{where}.{k}", f"must be a list of integers in [0, {size}], got {v!r}")
                if v is not None and k in PAIRS and len(v) != 2:  # one value per spatial axis (H, W)
                    raise fail(f"{where}.{k}", f"must hold 2 integers (height, width), got {v!r}")
            try:
                y = fn(op, xs)
            except PtqError:
                raise
            except Exception as exc:  # any shape failure here means an inconsistent manifest
                raise fail(where, f"op '{op.name}' cannot be executed: {type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]}") from None
            want = op.attrs.get("out_shape")
            if want is not None and list(y.shape[1:]) != want:
                raise fail(f"{where}.out_shape", f"op '{op.name}' produces shape {list(y.shape[1:])}, the manifest says {want!r}")
            return y
        return run

    g = m.graph
    graph = Graph(g["input"], tuple(g["input_shape"]),
                  [Op(r["name"], r["kind"], list(r["inputs"]), r["output"], r["attrs"], record=r) for r in g["ops"]],
                  list(g["outputs"]))
    kernels = {k: guard(f) for k, f in _shape_kernels(m).items()}
    with torch.no_grad():
        execute(graph, torch.empty((1, *g["input_shape"]), device="meta"), kernels)


def _check_dyadic(mult: np.ndarray, shift: np.ndarray, ratios: np.ndarray, where: str) -> None:
    """Requantizers are derived from the encodings' scales (m = round(M·2^n)); a multiplier, shift or
    scale edited on its own no longer agrees, and would silently compute a different model."""
    err = np.abs(mult.astype(np.float64) - ratios * np.exp2(shift.astype(np.float64)))
    if err.size and err.max() > 0.5 + 1e-6:
        raise fail(where, "multiplier/shift do not match the scales of the encodings and weights "
                          "(edited by hand?); re-run ptq quantize")


def _code_max(m: Manifest, t: str) -> int:
    return (1 << m.encoding(t)["bits"]) - 1


def _check_clamp(m: Manifest, op: dict, w: str) -> None:
    c = need(op, "clamp", list, w)
    hi = _code_max(m, op["output"])
    if len(c) != 2 or not all(type(v) is int for v in c) or not 0 <= c[0] <= c[1] <= hi:
        raise fail(f"{w}.clamp", f"must be two integers 0 <= lo <= hi <= {hi}, got {c}")


def _check_weighted(m: Manifest, op: dict, w: str) -> None:
    wt = need(op, "weight", dict, w)
    scheme = need(wt, "scheme", str, f"{w}.weight")
    if scheme not in SCHEMES:
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
    lim = qmax(bits)
    for j, t in enumerate(terms):
        q = tensor(m, t.get("q") if isinstance(t, dict) else None, f"{w}.weight.terms[{j}].q", "int", shape)
        in_range(q, -lim, lim, f"{w}.weight.terms[{j}].q")
        s = tensor(m, t.get("scale"), f"{w}.weight.terms[{j}].scale", "float", (c,))
        if np.any(s <= 0):
            raise fail(f"{w}.weight.terms[{j}].scale", "must be positive")
    SCHEMES[scheme](m, wt, f"{w}.weight")
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
    check_layer_records(op, w)


def _check_requantizing(m: Manifest, op: dict, w: str) -> None:
    """add, concat, avgpool: one dyadic multiplier per input sharing one shift, and a clamp."""
    kind = op["kind"]
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


def _check_lut(m: Manifest, op: dict, w: str) -> None:
    n = 1 << m.encoding(op["inputs"][0])["bits"]
    t = tensor(m, op.get("table"), f"{w}.table", "int", (n,))
    in_range(t, 0, _code_max(m, op["output"]), f"{w}.table")


def _check_pad_value(m: Manifest, op: dict, w: str) -> None:
    v = need(op, "pad_value", int, w)
    if not 0 <= v <= _code_max(m, op["output"]):
        raise fail(f"{w}.pad_value", f"must be a code of the output encoding, got {v}")


def _check_one_requant(m: Manifest, op: dict, w: str, factor: float) -> None:
    """One dyadic multiplier for factor·Π s_inputs / s_y, and a clamp."""
    r = need(op, "requant", dict, w)
    mult = need(r, "multiplier", list, f"{w}.requant")
    if len(mult) != 1 or not all(isinstance(v, int) and 0 <= v < 2**31 for v in mult):
        raise fail(f"{w}.requant.multiplier", "must be one integer in [0, 2^31)")
    sh = need(r, "shift", int, f"{w}.requant")
    if not 1 <= sh <= 62:
        raise fail(f"{w}.requant.shift", f"must be 1..62, got {sh}")
    ratio = factor * math.prod(m.encoding(t)["scale"] for t in op["inputs"]) / m.encoding(op["output"])["scale"]
    _check_dyadic(np.array(mult), np.array([sh]), np.array([ratio]), f"{w}.requant")
    _check_clamp(m, op, w)


def _check_scaling(m: Manifest, op: dict, w: str) -> None:
    """matmul and scale: one dyadic multiplier (alpha·s_a·s_b/s_y or factor·s_x/s_y), and a clamp."""
    key = "alpha" if op["kind"] == "matmul" else "factor"
    f = need(op["attrs"], key, (int, float), f"{w}.attrs")
    if not (math.isfinite(f) and f > 0):
        raise fail(f"{w}.attrs.{key}", f"must be positive and finite, got {f}")
    _check_one_requant(m, op, w, f)


def _check_offset(m: Manifest, op: dict, w: str) -> None:
    """One dyadic multiplier s_x/s_y, a clamp and the pads (the constant's shape: in the dry run)."""
    pads = need(op["attrs"], "pads", list, f"{w}.attrs")
    if len(pads) % 2 or not all(type(v) is int and v >= 0 for v in pads):
        raise fail(f"{w}.attrs.pads", f"must be (begin, end) pairs of non-negative integers, got {pads}")
    _check_one_requant(m, op, w, 1.0)


def _check_layernorm(m: Manifest, op: dict, w: str) -> None:
    """The integer ε, K and the per-channel requantizer (its tensors' shapes are checked in the dry run)."""
    r = need(op, "norm", dict, w)
    eps = need(op["attrs"], "eps", (int, float), f"{w}.attrs")
    if not (math.isfinite(eps) and eps >= 0):
        raise fail(f"{w}.attrs.eps", f"must be non-negative and finite, got {eps}")
    if not 0 <= need(r, "eps_q", int, f"{w}.norm") < 2**62:
        raise fail(f"{w}.norm.eps_q", "must be in [0, 2^62)")
    if not 0 <= need(r, "frac_bits", int, f"{w}.norm") <= 24:
        raise fail(f"{w}.norm.frac_bits", "must be 0..24")
    sh = tensor(m, r.get("shift"), f"{w}.norm.shift", "int", None)
    in_range(sh, 1, 62, f"{w}.norm.shift")
    mult = tensor(m, r.get("multiplier"), f"{w}.norm.multiplier", "int", sh.shape)
    in_range(mult, -(2**31 - 1), 2**31 - 1, f"{w}.norm.multiplier")
    in_range(tensor(m, r.get("bias"), f"{w}.norm.bias", "int", sh.shape), -(2**61), 2**61, f"{w}.norm.bias")
    gamma = tensor(m, r.get("gamma"), f"{w}.norm.gamma", "float", sh.shape).astype(np.float64)
    tensor(m, r.get("beta"), f"{w}.norm.beta", "float", sh.shape)
    ratio = gamma * math.sqrt(sh.size) / (m.encoding(op["output"])["scale"] * 2.0 ** r["frac_bits"])
    _check_dyadic(np.abs(mult), sh, np.abs(ratio), f"{w}.norm")
    _check_clamp(m, op, w)


def _check_softmax(m: Manifest, op: dict, w: str) -> None:
    """The exp table (non-increasing, at most one entry per input code, 2^F at distance 0) and 1/s_y."""
    if len(op["inputs"]) > 2:
        raise fail(f"{w}.inputs", "a softmax takes its scores and at most one keep mask")
    r = need(op, "exp", dict, w)
    f = need(r, "frac_bits", int, f"{w}.exp")
    if not 1 <= f <= 24:
        raise fail(f"{w}.exp.frac_bits", "must be 1..24")
    t = tensor(m, r.get("table"), f"{w}.exp.table", "int", None)
    if t.ndim != 1 or not 1 <= t.size <= 1 << m.encoding(op["inputs"][0])["bits"] or t[0] != 1 << f \
            or np.any(np.diff(t) > 0) or t.min() < 0:
        raise fail(f"{w}.exp.table", f"must be a non-increasing table from 2^{f} down, one entry per input code at most")
    mult, sh = need(r, "multiplier", int, f"{w}.exp"), need(r, "shift", int, f"{w}.exp")
    if not 0 <= mult < 2**31 or not 1 <= sh <= 62:
        raise fail(f"{w}.exp", "multiplier must be in [0, 2^31) and shift 1..62")
    _check_dyadic(np.array([mult]), np.array([sh]), np.array([1.0 / m.encoding(op["output"])["scale"]]), f"{w}.exp")


def _check_embedding(m: Manifest, op: dict, w: str) -> None:
    """The input carries token ids (the identity encoding); table and offset shapes: in the dry run."""
    e = m.encoding(op["inputs"][0])
    if (e["bits"], e["scale"], e["zero_point"]) != (16, 1.0, 0):
        raise fail(f"{w}.inputs", "an embedding's input must have the identity encoding (16 bits, scale 1, zero point 0)")
    need(op, "embedding", dict, w)


def _check_permute(m: Manifest, op: dict, w: str) -> None:
    perm = need(op["attrs"], "perm", list, f"{w}.attrs")
    if sorted(perm) != list(range(len(perm))) or not perm or perm[0] != 0:
        raise fail(f"{w}.attrs.perm", f"must be a permutation that keeps the batch dimension first, got {perm}")


def _check_slice(m: Manifest, op: dict, w: str) -> None:
    a = op["attrs"]
    if not all(type(a.get(k)) is int for k in ("dim", "start", "end", "step")) or a["dim"] < 1 \
            or a["step"] < 1 or not 0 <= a["start"] <= a["end"]:
        raise fail(f"{w}.attrs", "a slice needs integers dim >= 1, 0 <= start <= end and step >= 1")


# what each op kind's record must satisfy (the record fields themselves come from the op table)
CHECKS: dict[str, Callable[[Manifest, dict, str], None]] = require_all("validate", {
    "conv": _check_weighted, "linear": _check_weighted,
    "add": _check_requantizing, "concat": _check_requantizing, "avgpool": _check_requantizing,
    "lut": _check_lut, "clamp": _check_clamp, "maxpool": _check_pad_value, "pad": _check_pad_value,
    "reshape": lambda m, op, w: None,
    "matmul": _check_scaling, "scale": _check_scaling, "layernorm": _check_layernorm, "softmax": _check_softmax,
    "permute": _check_permute, "slice": _check_slice, "embedding": _check_embedding, "offset": _check_offset,
})
