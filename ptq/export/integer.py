"""The integer twin: an ONNX graph in which onnxruntime executes the integer contract bit for bit.

The QDQ twin (`ptq.export.qdq`) computes the float fake-quant semantics, so onnxruntime and the
integer simulator differ by float rounding: rare one-code differences that a network with 4- to
6-bit activations amplifies layer after layer (BENCHMARKS.md, ONNX table: acc16 on Lite0). This
format carries the codes themselves and repeats the simulator's arithmetic with exact ONNX ops:

- activation codes are uint8 tensors (int64 above 8 bits); the input is quantized in float64 as
  the simulator does, floor(x / s + 1/2) + z, clipped;
- conv / linear: ConvInteger / MatMulInteger on the uint8 codes with the input zero point (ONNX
  pads with the zero point, which is the simulator's zero padding of x - z) and int8 weights give
  the exact int32 accumulator (weights beyond ±64 as two digits 16·hi + lo, since CPUs without
  VNNI saturate u8×s8 pair sums at int16); the int32 bias is added in int64, a `wrap` accumulator is wrapped
  to P bits, and each term is multiplied by its integer mantissa m;
- requantization is the rounding right shift floor((Σ acc·m + 2^(n-1)) / 2^n) in int64, written
  as (v - Mod(v, 2^n)) / 2^n (ONNX integer Div truncates, Mod with fmod=0 takes the divisor's sign),
  then + z, Clip to the clamp codes, Cast;
- adds, concats and average pools use the same requantizer; max pools, pads, clamps and reshapes
  act on the codes; lookup tables are a Gather on the codes.
- transformer ops (README, Transformers): activation × activation matmuls as an int64 MatMul of the
  centred codes; LayerNorm and softmax as the steps of `ptq.intnorm` in int64 ops (ReduceSum,
  ReduceMax, a float64 Sqrt corrected to the exact integer square root, Mod-based floor division,
  a Gather of the exp table); embeddings as a Gather of the int32 rows by the id codes; an offset as
  the requantizer in int64, a Pad with zeros and an Add of its int32 constant; permutes and slices
  act on the codes.
- layers whose inputs have more than 8 bits, or weights more than 8, run as a float32 Conv/Gemm on
  integer-valued tensors, which is exact because the data-free bound on every partial sum (`accbound`) is
  checked to be below 2^24 at export; a linear layer whose bound passes 2^24 (an encoder's 12-bit
  GEMM inputs) runs in float64, exact below 2^52 (beyond either, the export is refused with the
  layer's name).

The first output is the dequantized logits in float64. Saturating accumulators are exported only
where the data-free bound proves that no partial sum can saturate. Node metadata are those of the
QDQ twin (the weight fields sit on the ConvInteger / MatMulInteger nodes).
"""
from __future__ import annotations

import numpy as np

from typing import Callable

from ..accbound import input_span, worst_accumulator
from ..errors import ManifestError
from ..intmath import F32_EXACT, qmax
from ..manifest import Manifest
from ..runtime.simulator import EXACT_LIMIT
from .onnxgraph import INPUT_NAME, GraphBuilder, slice_consts, torch_pads_to_onnx, weight_metadata


PAIR_SAFE = 64  # largest |weight| whose u8×s8 pair sums fit int16 for every uint8 code (2·255·64 ≤ 32767)


class IntegerBuilder(GraphBuilder):
    """Builds the `int` format on the shared builder's naming, constants, nodes and metadata."""

    fmt = "int"

    def __init__(self, m: Manifest):
        super().__init__(m)
        self._made: set[str] = set()  # shared int64 views of code tensors

    # -- codes --
    def code_type(self, t: str):
        return self.onnx.TensorProto.UINT8 if self.m.encoding(t)["bits"] <= 8 else self.onnx.TensorProto.INT64

    def code_np(self, t: str):
        return np.uint8 if self.m.encoding(t)["bits"] <= 8 else np.int64

    def code(self, t: str) -> str:
        return self.codes[t]

    def as_int64(self, name: str, op: str, kind: str) -> str:
        """name cast to int64 (once, however many ops consume it)."""
        out = f"{name}/i64"
        if out not in self._made:
            self.node("Cast", [name], [out], f"{op}/cast:{name}", op, kind, to=self.onnx.TensorProto.INT64)
            self._made.add(out)
        return out

    def centred(self, t: str, op: str, kind: str) -> str:
        """x - z of tensor t's codes in int64 (once per tensor)."""
        out = f"t/{t}/centred"
        if out not in self._made:
            z = int(self.m.encoding(t)["zero_point"])
            self.node("Sub", [self.as_int64(self.code(t), op, kind), self.const(f"{t}/z.i64", np.array(z, np.int64))],
                      [out], f"{op}/centre:{t}", op, kind)
            self._made.add(out)
        return out

    def xmax(self, t: str) -> int:
        """Largest |code - z| of tensor t."""
        e = self.m.encoding(t)
        return max(int(e["zero_point"]), (1 << int(e["bits"])) - 1 - int(e["zero_point"]))

    def requant(self, parts: list[tuple[str, np.ndarray, np.ndarray]], shift: np.ndarray, t: str, op: str,
                kind: str, clamp: list[int] | None, view: tuple[int, ...], codes: str | None = None) -> str:
        """codes(t) = clip(floor((Σ part·m + 2^(n-1)) / 2^n) + z, clamp) for int64 parts with |part| ≤ bound.

        In float64 when Σ bound·m + 2^(n-1) < 2^52 in every channel (every intermediate is then an
        integer, or a power-of-two scaling of one, below 2^53: exact, as in `intmath.dyadic_sum`),
        else in int64 with the floor division written as (v - Mod(v, 2^n)) / 2^n."""
        e = self.m.encoding(t)
        shift = np.asarray(shift, np.int64).reshape(view)
        need = np.exp2(shift - 1.0) + sum(np.asarray(b, np.float64).reshape(view) * np.asarray(m, np.float64).reshape(view)
                                          for _, m, b in parts)
        exact_float = bool(np.all(need < 2.0 ** 52))
        P = self.onnx.TensorProto
        dt = np.float64 if exact_float else np.int64
        prods = []
        for i, (p, m, _) in enumerate(parts):
            if exact_float:
                self.node("Cast", [p], [f"{op}/term{i}/f64"], f"{op}/cast:term{i}", op, kind, to=P.DOUBLE)
                p = f"{op}/term{i}/f64"
            out = f"{op}/term{i}/scaled"
            self.node("Mul", [p, self.const(f"{op}/m{i}.{np.dtype(dt).name}", np.asarray(m, dt).reshape(view))], [out],
                      f"{op}/mul:m{i}", op, kind)
            prods.append(out)
        v = prods[0]
        for i, p in enumerate(prods[1:], 1):  # Sum has no integer kernel: a chain of Adds
            self.node("Add", [v, p], [f"{op}/acc_sum{i}"], f"{op}/sum_terms{i}", op, kind)
            v = f"{op}/acc_sum{i}"
        b = f"{op}/rq"
        if exact_float:
            self.node("Add", [v, self.const(f"{op}/half.f64", np.exp2(shift - 1.0))], [b + "/biased"], f"{op}/round", op, kind)
            self.node("Mul", [b + "/biased", self.const(f"{op}/inv2n.f64", np.exp2(-shift.astype(np.float64)))],
                      [b + "/scaled"], f"{op}/scale", op, kind)
            self.node("Floor", [b + "/scaled"], [b + "/shifted"], f"{op}/floor", op, kind)
        else:
            div = self.const(f"{op}/pow2n", np.left_shift(np.int64(1), shift))
            self.node("Add", [v, self.const(f"{op}/half", np.left_shift(np.int64(1), shift - 1))], [b + "/biased"],
                      f"{op}/round", op, kind)
            self.node("Mod", [b + "/biased", div], [b + "/rem"], f"{op}/mod", op, kind, fmod=0)
            self.node("Sub", [b + "/biased", b + "/rem"], [b + "/floor"], f"{op}/floor", op, kind)
            self.node("Div", [b + "/floor", div], [b + "/shifted"], f"{op}/shift", op, kind)
        self.node("Add", [b + "/shifted", self.const(f"{t}/z.{np.dtype(dt).name}", np.array(int(e["zero_point"]), dt))],
                  [b + "/zp"], f"{op}/zero_point", op, kind)
        return self.store(t, b + "/zp", op, kind, clamp, wide=True, codes=codes, dtype=dt)

    def store(self, t: str, x: str, op: str, kind: str, clamp: list[int] | None, wide: bool,
              codes: str | None = None, dtype=np.int64) -> str:
        """Clip x (of `dtype` if wide, else of t's code type) to t's clamp codes and cast it to t's code type.

        The result becomes t's code tensor unless another name is given (the parts of a concat)."""
        e = self.m.encoding(t)
        bits = int(e["bits"])
        if bits > 16:
            raise ManifestError(f"tensor {t}: {bits}-bit activations cannot be exported (at most 16)")
        lo, hi = (0, (1 << bits) - 1) if clamp is None else (int(clamp[0]), int(clamp[1]))
        ctype = dtype if wide else self.code_np(t)
        out = codes or f"t/{t}/q"
        clipped = f"{out}/clipped"
        self.node("Clip", [x, self.const(f"{t}/lo.{np.dtype(ctype).name}", np.array(lo, ctype)),
                           self.const(f"{t}/hi.{np.dtype(ctype).name}", np.array(hi, ctype))],
                  [clipped], f"{op}/clip:{t}", op, kind, {"ptq.tensor": t, "ptq.clamp": [lo, hi]})
        self.node("Cast", [clipped], [out], f"{op}/codes:{t}", op, kind,
                  {"ptq.tensor": t, "ptq.act_bits": bits}, to=self.code_type(t))
        if codes is None:
            self.codes[t] = out
        return out

    # -- weighted layers --
    def integer_product(self, rec: dict, t: str, q: np.ndarray, out: str, meta: dict | None, wname: str) -> str:
        """ConvInteger / MatMulInteger of t's uint8 codes (zero point t's) with int8 weights q: int32 `out`."""
        name, kind, a = rec["name"], rec["kind"], rec["attrs"]
        node = out[:-len("/acc32")] if out.endswith("/acc32") else out
        xz = self.const(f"{t}/z.u8", np.array(int(self.m.encoding(t)["zero_point"]), np.uint8))
        if kind == "conv":
            ph, pw = a["padding"]
            self.node("ConvInteger", [self.code(t), self.const(wname, q.astype(np.int8)), xz], [out],
                      node, name, kind, meta, kernel_shape=list(q.shape[2:]), strides=list(a["stride"]),
                      pads=[ph, pw, ph, pw], dilations=list(a["dilation"]), group=int(a["groups"]))
        else:
            self.node("MatMulInteger", [self.code(t), self.const(wname + "T", np.ascontiguousarray(q.T.astype(np.int8))), xz],
                      [out], node, name, kind, meta)
        return out

    def accumulate(self, rec: dict, term: int, q: np.ndarray) -> tuple[str, np.ndarray]:
        """Exact accumulator (int64) of one weight term, bias added to term 0, wrapped if `wrap` and
        the data-free bound allows an overflow; with that bound on |acc| per channel."""
        name, kind, a = rec["name"], rec["kind"], rec["attrs"]
        t = rec["inputs"][0]
        ex, z = self.m.encoding(t), int(self.m.encoding(t)["zero_point"])
        bits = int(rec["weight"].get("bits", 8))
        conv = kind == "conv"
        bias = self.m.tensor(rec["bias"]["q"]).astype(np.int64) if term == 0 else np.zeros(q.shape[0], np.int64)
        meta = {**weight_metadata(rec), "ptq.term": term}
        acc32 = f"{name}/term{term}/acc32"
        bound = worst_accumulator(q, *input_span(ex["bits"], z), bias)  # every partial sum, any order
        if ex["bits"] <= 8 and bits <= 8 and np.abs(q).max(initial=0) <= 127:
            # u8×s8 kernels without VNNI sum adjacent products in saturating int16 (onnxruntime's
            # MLAS on AVX2): exact only while 2·255·max|q| ≤ 32767. Wider weights run as two digits,
            # q = 16·hi + lo with lo in [0, 15] and hi in [-8, 7], recombined in int64.
            if np.abs(q).max(initial=0) <= PAIR_SAFE:
                acc = self.as_int64(self.integer_product(rec, t, q, acc32, meta, f"{name}/w{term}.q"), name, kind)
            else:
                lo = np.mod(q, 16)
                hi = (q - lo) // 16
                acc_hi = self.as_int64(self.integer_product(rec, t, hi, acc32, meta, f"{name}/w{term}.q.hi"), name, kind)
                acc_lo = self.as_int64(self.integer_product(rec, t, lo, f"{name}/term{term}/lo/acc32", None, f"{name}/w{term}.q.lo"), name, kind)
                self.node("Mul", [acc_hi, self.const("digit16.i64", np.array(16, np.int64))], [f"{acc32}/hi16"],
                          f"{name}/term{term}/hi16", name, kind)
                acc = f"{name}/term{term}/digits"
                self.node("Add", [f"{acc32}/hi16", acc_lo], [acc], f"{name}/term{term}/digits", name, kind)
        else:
            # float32 while the bound keeps every partial sum below 2^24; a linear layer beyond it (an
            # encoder's 12-bit GEMM inputs) accumulates in float64, exact below 2^52
            wide = float(bound.max()) >= F32_EXACT
            if wide and (conv or float(bound.max()) >= EXACT_LIMIT):
                limit = "2^24" if conv else "2^52"
                raise ManifestError(f"layer {name}: {ex['bits']}-bit inputs or {bits}-bit weights need a float "
                                    f"accumulation that is not provably exact (bound ≥ {limit}); export --format qdq instead")
            ftype, fsuffix = (self.onnx.TensorProto.DOUBLE, "f64") if wide else (self.onnx.TensorProto.FLOAT, "f32")
            fdtype = np.float64 if wide else np.float32
            xf = f"{name}/x.{fsuffix}"
            if xf not in self._made:  # once per layer and type: a multipoint layer's terms read the same input
                self.node("Cast", [self.centred(t, name, kind)], [xf], f"{name}/cast:x.{fsuffix}", name, kind, to=ftype)
                self._made.add(xf)
            wf = self.const(f"{name}/w{term}.{fsuffix}", q.astype(fdtype))
            accf = f"{name}/term{term}/accf"
            if conv:
                ph, pw = a["padding"]
                self.node("Conv", [xf, wf], [accf], f"{name}/term{term}", name, kind, meta,
                          kernel_shape=list(q.shape[2:]), strides=list(a["stride"]), pads=[ph, pw, ph, pw],
                          dilations=list(a["dilation"]), group=int(a["groups"]))
            elif len(a["out_shape"]) == 1:
                self.node("Gemm", [xf, wf], [accf], f"{name}/term{term}", name, kind, meta, transB=1)
            else:  # (N, ..., K) inputs: Gemm takes matrices only
                wt = self.const(f"{name}/w{term}.{fsuffix}T", np.ascontiguousarray(q.reshape(q.shape[0], -1).T.astype(fdtype)))
                self.node("MatMul", [xf, wt], [accf], f"{name}/term{term}", name, kind, meta)
            acc = self.as_int64(accf, name, kind)
        view = (-1, 1, 1) if conv else (-1,)
        if term == 0:
            self.node("Add", [acc, self.const(f"{name}/bias.i64", bias.reshape(view))], [f"{name}/term0/biased"],
                      f"{name}/bias", name, kind)
            acc = f"{name}/term0/biased"
        accr = rec.get("accumulator", {})
        p, mode = int(accr.get("bits", 32)), accr.get("mode", "exact")
        if mode == "saturate" and int(accr.get("data_free_bits", 64)) > p:
            raise ManifestError(f"layer {name}: a saturating {p}-bit accumulator without a data-free guarantee "
                                "cannot be expressed in ONNX; export --format qdq instead")
        if mode == "wrap" and p < 63 and float(bound.max()) > qmax(p):
            half = self.const(f"acc.half{p}", np.array(1 << (p - 1), np.int64))
            self.node("Add", [acc, half], [f"{name}/term{term}/w0"], f"{name}/wrap{term}/add", name, kind)
            self.node("Mod", [f"{name}/term{term}/w0", self.const(f"acc.mod{p}", np.array(1 << p, np.int64))],
                      [f"{name}/term{term}/w1"], f"{name}/wrap{term}/mod", name, kind, fmod=0)
            self.node("Sub", [f"{name}/term{term}/w1", half], [f"{name}/term{term}/wrapped"],
                      f"{name}/wrap{term}/sub", name, kind)
            acc = f"{name}/term{term}/wrapped"
            bound = np.minimum(bound, float(1 << (p - 1)))
        return acc, bound

    def emitters(self) -> dict[str, Callable[[dict], None]]:
        return {"conv": self._weighted, "linear": self._weighted, "add": self._add, "concat": self._concat,
                "avgpool": self._avgpool, "maxpool": self._maxpool, "reshape": self._reshape, "pad": self._pad,
                "clamp": self._clamp, "lut": self._lut, "matmul": self._matmul, "scale": self._scale,
                "layernorm": self._layernorm, "softmax": self._softmax, "permute": self._permute, "slice": self._slice,
                "embedding": self._embedding, "offset": self._offset}

    def _weighted(self, rec: dict) -> None:
        r = rec["requant"]
        view = (-1, 1, 1) if rec["kind"] == "conv" else (-1,)
        mult = np.asarray(self.m.tensor(r["multiplier"]), np.int64)
        terms = rec["weight"]["terms"]
        parts = [(*self.accumulate(rec, i, np.asarray(self.m.tensor(tm["q"]))), mult[i]) for i, tm in enumerate(terms)]
        parts = [(acc, m, bound) for acc, bound, m in parts]
        self.requant(parts, np.asarray(self.m.tensor(r["shift"])), rec["output"], rec["name"], rec["kind"],
                     rec.get("clamp"), view)

    def _add(self, rec: dict) -> None:
        name, kind, r = rec["name"], rec["kind"], rec["requant"]
        parts = [(self.centred(x, name, kind), np.array(m), np.array(self.xmax(x))) for x, m in zip(rec["inputs"], r["multiplier"])]
        self.requant(parts, np.array(r["shift"]), rec["output"], name, kind, rec.get("clamp"), ())

    def _concat(self, rec: dict) -> None:
        name, kind, r, t = rec["name"], rec["kind"], rec["requant"], rec["output"]
        pieces = []
        for i, (x, m) in enumerate(zip(rec["inputs"], r["multiplier"])):
            pieces.append(self.requant([(self.centred(x, name, kind), np.array(m), np.array(self.xmax(x)))], np.array(r["shift"]), t,
                                       f"{name}/part{i}", kind, rec.get("clamp"), (), codes=f"t/{t}/part{i}"))
        self.node("Concat", pieces, [f"t/{t}/q"], name, name, kind, axis=int(rec["attrs"]["dim"]))
        self.codes[t] = f"t/{t}/q"

    def _avgpool(self, rec: dict) -> None:
        name, kind, a, r = rec["name"], rec["kind"], rec["attrs"], rec["requant"]
        x = rec["inputs"][0]
        if a.get("global"):
            s = f"{name}/sum"
            self.node("ReduceSum", [self.centred(x, name, kind), self.const("axes.hw", np.array([2, 3], np.int64))],
                      [s], name, name, kind, keepdims=1)
        else:
            if self.m.encoding(x)["bits"] > 8:
                raise ManifestError(f"layer {name}: average pooling of {self.m.encoding(x)['bits']}-bit codes cannot be exported to the int format")
            c = int(a["out_shape"][0])
            kh, kw = a["kernel"]
            ph, pw = a["padding"]
            s32 = f"{name}/sum32"
            self.node("ConvInteger", [self.code(x), self.const(f"{name}/ones", np.ones((c, 1, kh, kw), np.uint8)),
                                      self.const(f"{x}/z.u8", np.array(int(self.m.encoding(x)["zero_point"]), np.uint8))],
                      [s32], name, name, kind, kernel_shape=[kh, kw], strides=list(a["stride"]),
                      pads=[ph, pw, ph, pw], group=c)
            s = self.as_int64(s32, name, kind)
        self.requant([(s, np.array(r["multiplier"][0]), np.array(r["count"] * self.xmax(x)))], np.array(r["shift"]),
                     rec["output"], name, kind, rec.get("clamp"), ())

    def _maxpool(self, rec: dict) -> None:
        """On uint8 codes; wider codes (at most 16 bits) are exact in float32."""
        name, kind, a, src = rec["name"], rec["kind"], rec["attrs"], rec["inputs"][0]
        x = self.code(src)
        wide = self.m.encoding(src)["bits"] > 8
        if wide:
            self.node("Cast", [x], [f"{name}/x.f32"], f"{name}/cast:x", name, kind, to=self.onnx.TensorProto.FLOAT)
            x = f"{name}/x.f32"
        ph, pw = a["padding"]
        if ph or pw:
            x = self.pad_codes(rec, x, [0, 0, ph, pw, 0, 0, ph, pw], f"{name}/pad", np.float32 if wide else None)
        y = f"{name}/max"
        self.node("MaxPool", [x], [y], name, name, kind, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
                  dilations=list(a["dilation"]), ceil_mode=int(bool(a["ceil_mode"])))
        if wide:
            self.node("Cast", [y], [f"{y}/i64"], f"{name}/cast:y", name, kind, to=self.onnx.TensorProto.INT64)
            y = f"{y}/i64"
        self.store(rec["output"], y, name, kind, rec.get("clamp"), wide=wide)

    def _reshape(self, rec: dict) -> None:
        name, kind = rec["name"], rec["kind"]
        y = f"{name}/reshaped"
        self.node("Reshape", [self.code(rec["inputs"][0]), self.const(f"{name}/shape", np.array([0, *rec["attrs"]["shape"]], np.int64))],
                  [y], name, name, kind)
        self.store(rec["output"], y, name, kind, rec.get("clamp"), wide=False)

    def _pad(self, rec: dict) -> None:
        a = rec["attrs"]
        y = self.pad_codes(rec, self.code(rec["inputs"][0]), torch_pads_to_onnx(a["pads"], 1 + len(a["out_shape"])), rec["name"])
        self.store(rec["output"], y, rec["name"], rec["kind"], rec.get("clamp"), wide=False)

    def _clamp(self, rec: dict) -> None:
        self.store(rec["output"], self.code(rec["inputs"][0]), rec["name"], rec["kind"], rec.get("clamp"), wide=False)

    def _lut(self, rec: dict) -> None:
        name, kind, t = rec["name"], rec["kind"], rec["output"]
        table = np.asarray(self.m.tensor(rec["table"])).astype(self.code_np(t))
        y = f"{name}/lookup"
        self.node("Gather", [self.const(f"{name}/table", table), self.as_int64(self.code(rec["inputs"][0]), name, kind)],
                  [y], name, name, kind, {"ptq.lut": rec["attrs"]["function"]}, axis=0)
        self.store(t, y, name, kind, rec.get("clamp"), wide=False)

    def floor_div(self, a: str, b: str, out: str, op: str, kind: str) -> str:
        """⌊a/b⌋ of int64 tensors for b > 0: ONNX Div truncates, so (a − Mod(a, b)) / b (Mod takes b's sign)."""
        self.node("Mod", [a, b], [f"{out}/rem"], f"{out}/mod", op, kind, fmod=0)
        self.node("Sub", [a, f"{out}/rem"], [f"{out}/floor"], f"{out}/floor", op, kind)
        self.node("Div", [f"{out}/floor", b], [out], f"{out}/div", op, kind)
        return out

    def i64(self, name: str, value) -> str:
        return self.const(name, np.asarray(value, np.int64))

    def _matmul(self, rec: dict) -> None:
        """Σ(a − z_a)(b − z_b) as an int64 MatMul (exact), then the dyadic requantizer."""
        name, kind, r = rec["name"], rec["kind"], rec["requant"]
        a, b = rec["inputs"]
        acc = f"{name}/acc"
        self.node("MatMul", [self.centred(a, name, kind), self.centred(b, name, kind)], [acc], name, name, kind)
        k = int(self.shape_of(a)[-1])
        self.requant([(acc, np.array(r["multiplier"][0]), np.array(float(self.xmax(a)) * self.xmax(b) * k))],
                     np.array(r["shift"]), rec["output"], name, kind, rec.get("clamp"), ())

    def _scale(self, rec: dict) -> None:
        name, kind, r, x = rec["name"], rec["kind"], rec["requant"], rec["inputs"][0]
        self.requant([(self.centred(x, name, kind), np.array(r["multiplier"][0]), np.array(self.xmax(x)))],
                     np.array(r["shift"]), rec["output"], name, kind, rec.get("clamp"), ())

    def _layernorm(self, rec: dict) -> None:
        """The steps of `intnorm.layernorm_t` and the per-channel requantizer, in int64 ONNX ops."""
        name, kind, r, x = rec["name"], rec["kind"], rec["norm"], rec["inputs"][0]
        d = int(self.shape_of(x)[-1])
        last = self.i64("axes.last", [-1])
        u = self.centred(x, name, kind)
        p = f"{name}/ln"
        self.node("ReduceSum", [u, last], [f"{p}/sum"], f"{p}/sum", name, kind, keepdims=1)
        self.node("Mul", [u, self.i64(f"{name}/D", d)], [f"{p}/du"], f"{p}/du", name, kind)
        self.node("Sub", [f"{p}/du", f"{p}/sum"], [f"{p}/c"], f"{p}/c", name, kind)
        self.node("Mul", [f"{p}/c", f"{p}/c"], [f"{p}/c2"], f"{p}/c2", name, kind)
        self.node("ReduceSum", [f"{p}/c2", last], [f"{p}/v0"], f"{p}/var", name, kind, keepdims=1)
        self.node("Add", [f"{p}/v0", self.i64(f"{name}/eps_q", r["eps_q"])], [f"{p}/v"], f"{p}/eps", name, kind)
        P = self.onnx.TensorProto
        self.node("Cast", [f"{p}/v"], [f"{p}/vf"], f"{p}/cast:v", name, kind, to=P.DOUBLE)
        self.node("Sqrt", [f"{p}/vf"], [f"{p}/sf"], f"{p}/sqrt", name, kind)
        self.node("Floor", [f"{p}/sf"], [f"{p}/ff"], f"{p}/floor_sqrt", name, kind)
        self.node("Cast", [f"{p}/ff"], [f"{p}/r0"], f"{p}/cast:r", name, kind, to=P.INT64)
        one = self.i64("one.i64", 1)
        # exact ⌊√v⌋: one step down where r² > v, one up where (r + 1)² ≤ v
        self.node("Mul", [f"{p}/r0", f"{p}/r0"], [f"{p}/r0sq"], f"{p}/r0sq", name, kind)
        self.node("Greater", [f"{p}/r0sq", f"{p}/v"], [f"{p}/over"], f"{p}/over", name, kind)
        self.node("Cast", [f"{p}/over"], [f"{p}/over64"], f"{p}/cast:over", name, kind, to=P.INT64)
        self.node("Sub", [f"{p}/r0", f"{p}/over64"], [f"{p}/r1"], f"{p}/down", name, kind)
        self.node("Add", [f"{p}/r1", one], [f"{p}/r1p"], f"{p}/r1p", name, kind)
        self.node("Mul", [f"{p}/r1p", f"{p}/r1p"], [f"{p}/r1psq"], f"{p}/r1psq", name, kind)
        self.node("Greater", [f"{p}/r1psq", f"{p}/v"], [f"{p}/high"], f"{p}/high", name, kind)
        self.node("Not", [f"{p}/high"], [f"{p}/under"], f"{p}/under", name, kind)
        self.node("Cast", [f"{p}/under"], [f"{p}/under64"], f"{p}/cast:under", name, kind, to=P.INT64)
        self.node("Add", [f"{p}/r1", f"{p}/under64"], [f"{p}/r2"], f"{p}/up", name, kind)
        self.node("Max", [f"{p}/r2", one], [f"{p}/r"], f"{p}/r", name, kind)
        # t = ⌊(2·c·2^K + r) / (2r)⌋
        self.node("Mul", [f"{p}/c", self.i64(f"{name}/two_pow_k1", 2 << int(r["frac_bits"]))], [f"{p}/c2k"], f"{p}/c2k", name, kind)
        self.node("Add", [f"{p}/c2k", f"{p}/r"], [f"{p}/num"], f"{p}/num", name, kind)
        self.node("Add", [f"{p}/r", f"{p}/r"], [f"{p}/den"], f"{p}/den", name, kind)
        t = self.floor_div(f"{p}/num", f"{p}/den", f"{p}/t", name, kind)
        shift = np.asarray(self.m.tensor(r["shift"]), np.int64)
        self.node("Mul", [t, self.i64(f"{name}/norm.m", self.m.tensor(r["multiplier"]))], [f"{p}/tm"], f"{p}/mul:m", name, kind)
        self.node("Add", [f"{p}/tm", self.i64(f"{name}/norm.b_half", self.m.tensor(r["bias"]) + np.left_shift(np.int64(1), shift - 1))],
                  [f"{p}/biased"], f"{p}/bias", name, kind)
        y = self.floor_div(f"{p}/biased", self.i64(f"{name}/norm.pow2n", np.left_shift(np.int64(1), shift)), f"{p}/y", name, kind)
        zy = int(self.m.encoding(rec["output"])["zero_point"])
        self.node("Add", [y, self.i64(f"{rec['output']}/z.int64", zy)], [f"{p}/zp"], f"{p}/zero_point", name, kind)
        self.store(rec["output"], f"{p}/zp", name, kind, rec.get("clamp"), wide=True)

    def _softmax(self, rec: dict) -> None:
        """The steps of `intnorm.softmax_codes` in int64 ONNX ops."""
        name, kind, r, x = rec["name"], rec["kind"], rec["exp"], rec["inputs"][0]
        table = np.asarray(self.m.tensor(r["table"]), np.int64)
        last = self.i64("axes.last", [-1])
        p = f"{name}/sm"
        xi = self.as_int64(self.code(x), name, kind)
        keep = None
        if len(rec["inputs"]) == 2:  # x·keep + keep − 1: a dropped key's code becomes −1
            mask = rec["inputs"][1]
            self.node("Equal", [self.as_int64(self.code(mask), name, kind),
                                self.i64(f"{mask}/z.int64", int(self.m.encoding(mask)["zero_point"]))],
                      [f"{p}/dropped"], f"{p}/dropped", name, kind)
            self.node("Not", [f"{p}/dropped"], [f"{p}/kept"], f"{p}/kept", name, kind)
            keep = f"{p}/keep"
            self.node("Cast", [f"{p}/kept"], [keep], f"{p}/cast:keep", name, kind, to=self.onnx.TensorProto.INT64)
            self.node("Mul", [xi, keep], [f"{p}/xk"], f"{p}/xk", name, kind)
            self.node("Sub", [keep, self.i64("one.i64", 1)], [f"{p}/km1"], f"{p}/km1", name, kind)
            self.node("Add", [f"{p}/xk", f"{p}/km1"], [f"{p}/xm"], f"{p}/xm", name, kind)
            xi = f"{p}/xm"
        self.node("ReduceMax", [xi, last], [f"{p}/max"], f"{p}/max", name, kind, keepdims=1)
        self.node("Sub", [f"{p}/max", xi], [f"{p}/d0"], f"{p}/distance", name, kind)
        self.node("Clip", [f"{p}/d0", self.i64("zero.i64", 0), self.i64(f"{name}/last_entry", table.size - 1)], [f"{p}/d"],
                  f"{p}/cut", name, kind)
        self.node("Gather", [self.const(f"{name}/exp", table), f"{p}/d"], [f"{p}/e"], f"{p}/exp", name, kind, axis=0)
        if keep is not None:
            self.node("Mul", [f"{p}/e", keep], [f"{p}/e_kept"], f"{p}/exp_kept", name, kind)
        e = f"{p}/e_kept" if keep is not None else f"{p}/e"
        self.node("ReduceSum", [e, last], [f"{p}/sum0"], f"{p}/sum", name, kind, keepdims=1)
        self.node("Max", [f"{p}/sum0", self.i64("one.i64", 1)], [f"{p}/sum"], f"{p}/sum_at_least_1", name, kind)
        self.node("Mul", [f"{p}/sum", self.i64(f"{name}/pow2n", 1 << int(r["shift"]))], [f"{p}/total"], f"{p}/total", name, kind)
        self.node("Mul", [e, self.i64(f"{name}/two_m", 2 * int(r["multiplier"]))], [f"{p}/em"], f"{p}/em", name, kind)
        self.node("Add", [f"{p}/em", f"{p}/total"], [f"{p}/num"], f"{p}/num", name, kind)
        self.node("Add", [f"{p}/total", f"{p}/total"], [f"{p}/den"], f"{p}/den", name, kind)
        y = self.floor_div(f"{p}/num", f"{p}/den", f"{p}/y", name, kind)
        zy = int(self.m.encoding(rec["output"])["zero_point"])
        self.node("Add", [y, self.i64(f"{rec['output']}/z.int64", zy)], [f"{p}/zp"], f"{p}/zero_point", name, kind)
        self.store(rec["output"], f"{p}/zp", name, kind, None, wide=True)

    def _embedding(self, rec: dict) -> None:
        """Gather of the int32 table rows by the id codes, + the offset rows and z_y in int64."""
        name, kind, r, t = rec["name"], rec["kind"], rec["embedding"], rec["output"]
        self.node("Gather", [self.const(f"{name}/table", np.asarray(self.m.tensor(r["table"]), np.int32)),
                             self.as_int64(self.code(rec["inputs"][0]), name, kind)], [f"{name}/rows"], name, name, kind, axis=0)
        rows = self.as_int64(f"{name}/rows", name, kind)
        z = int(self.m.encoding(t)["zero_point"])
        self.node("Add", [rows, self.i64(f"{name}/offset_z", np.asarray(self.m.tensor(r["offset"]), np.int64) + z)],
                  [f"{name}/y"], f"{name}/offset", name, kind)
        self.store(t, f"{name}/y", name, kind, None, wide=True)

    def _offset(self, rec: dict) -> None:
        """round(u·m / 2^n) in int64, padded with zeros where the constant rows go, + K + z_y."""
        name, kind, r, t, x = rec["name"], rec["kind"], rec["requant"], rec["output"], rec["inputs"][0]
        shift = int(r["shift"])
        self.node("Mul", [self.centred(x, name, kind), self.i64(f"{name}/m", int(r["multiplier"][0]))], [f"{name}/um"],
                  f"{name}/mul:m", name, kind)
        self.node("Add", [f"{name}/um", self.i64(f"{name}/half", 1 << (shift - 1))], [f"{name}/biased"], f"{name}/round", name, kind)
        v = self.floor_div(f"{name}/biased", self.i64(f"{name}/pow2n", 1 << shift), f"{name}/v", name, kind)
        pads = torch_pads_to_onnx(rec["attrs"]["pads"], 1 + len(rec["attrs"]["out_shape"]))
        self.node("Pad", [v, self.i64(f"{name}/pads", pads), self.i64("zero.i64", 0)], [f"{name}/padded"], f"{name}/pad",
                  name, kind, mode="constant")
        k = np.asarray(self.m.tensor(rec["offset"]), np.int64) + int(self.m.encoding(t)["zero_point"])
        self.node("Add", [f"{name}/padded", self.i64(f"{name}/offset_z", k)], [f"{name}/y"], f"{name}/offset", name, kind)
        self.store(t, f"{name}/y", name, kind, rec.get("clamp"), wide=True)

    def _permute(self, rec: dict) -> None:
        name, kind = rec["name"], rec["kind"]
        self.node("Transpose", [self.code(rec["inputs"][0])], [f"{name}/permuted"], name, name, kind, perm=list(rec["attrs"]["perm"]))
        self.store(rec["output"], f"{name}/permuted", name, kind, None, wide=False)

    def _slice(self, rec: dict) -> None:
        name, kind = rec["name"], rec["kind"]
        self.node("Slice", [self.code(rec["inputs"][0]), *slice_consts(self, rec)], [f"{name}/sliced"], name, name, kind)
        self.store(rec["output"], f"{name}/sliced", name, kind, None, wide=False)

    def pad_codes(self, rec: dict, x: str, pads: list[int], name: str, dtype=None) -> str:
        t = rec["inputs"][0]
        out = f"{name}/padded"
        self.node("Pad", [x, self.const(f"{name}/pads", np.array(pads, np.int64)),
                          self.const(f"{name}/value", np.array(int(rec["pad_value"]), dtype or self.code_np(t)))], [out],
                  name, rec["name"], rec["kind"], mode="constant")
        return out

    def quantize_input(self) -> None:
        t = self.m.graph["input"]
        e = self.m.encoding(t)
        P = self.onnx.TensorProto
        self.node("Cast", [INPUT_NAME], ["input/f64"], "input/cast", "input", "input", to=P.DOUBLE)
        self.node("Div", ["input/f64", self.const(f"{t}/scale.f64", np.array(float(e["scale"]), np.float64))],
                  ["input/scaled"], "input/scale", "input", "input")
        self.node("Add", ["input/scaled", self.const("half.f64", np.array(0.5, np.float64))], ["input/half"],
                  "input/round", "input", "input")
        self.node("Floor", ["input/half"], ["input/floor"], "input/floor", "input", "input")
        self.node("Cast", ["input/floor"], ["input/i64"], "input/int", "input", "input", to=P.INT64)
        self.node("Add", ["input/i64", self.const(f"{t}/z.i64", np.array(int(e["zero_point"]), np.int64))],
                  ["input/zp"], "input/zero_point", "input", "input")
        self.store(t, "input/zp", "input", "input", None, wide=True)  # int64

    def output(self, t: str) -> tuple[str, int]:
        """The dequantized output s·(q - z) in float64."""
        e = self.m.encoding(t)
        out = self.fname(t)
        f = f"{out}/codes.f64"
        self.node("Cast", [self.code(t)], [f], f"output/cast:{t}", "output", "output", to=self.onnx.TensorProto.DOUBLE)
        self.node("Sub", [f, self.const(f"{t}/z.f64", np.array(float(e["zero_point"]), np.float64))], [f + "/centred"],
                  f"output/centre:{t}", "output", "output")
        self.node("Mul", [f + "/centred", self.const(f"{t}/scale.f64", np.array(float(e["scale"]), np.float64))],
                  [out], f"output/dequant:{t}", "output", "output")
        return out, self.onnx.TensorProto.DOUBLE
