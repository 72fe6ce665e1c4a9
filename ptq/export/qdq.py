"""ONNX export of a manifest: a QDQ twin for onnxruntime and a QONNX twin for FINN-style toolchains.

The graph is built from the manifest alone (never by re-tracing torch) and computes the float
fake-quant semantics of `ptq.runtime.reference`:

- every activation tensor t is quantized with its manifest encoding: QuantizeLinear ->
  DequantizeLinear (uint8 codes for <= 8 bits, uint16 for 9..16 bits). Encodings narrower than
  the storage type, and fused activation clamps, are realised by a Clip in front of the
  QuantizeLinear whose bounds are the dequantized clamp codes s*(lo - z), s*(hi - z). Because
  quantization is monotone this equals clamping the codes, as the reference does.
- weights are int4 (packed two per byte, at most 4 bits), int8 (int16/int32 above 8 bits) initializers with per-output-channel
  DequantizeLinear (axis 0, zero point 0). A weight with several terms (multipoint,
  w = sum_t scale_t * q_t) is dequantized term by term and the terms are summed (one `Sum` node)
  before a single Conv/Gemm: onnxruntime runs this as one float convolution, which is the
  reference's arithmetic (one GEMM on the dequantized weight). The QONNX twin stores the same
  integer codes (int8 and up) and feeds each term's Quant node with Cast(q)·scale, so the file holds
  no float copy of a weight; qonnx's cleanup folds that into the float initializer a Quant reads.
- biases are float: the int32 bias dequantized at s_x·scale_0 (bias correction included), added by the
  Conv/Gemm.
- lookup tables (`lut`) are evaluated exactly as the integer program does: the input codes index
  the table. In the QDQ graph the uint codes of the input QuantizeLinear are cast to int64 and
  gathered from the dequantized table s_y*(table - z_y); the result is re-quantized with the
  output encoding (exact: every table value is on the output grid). In the QONNX graph, which has
  no code tensors, the codes are recovered as Round(x/s + z) first.
- pad / maxpool padding use the record's `pad_value` code, in the float domain s*(pad_value - z).
- transformer ops are their float ONNX ops: MatMul (× α), Mul, LayerNormalization, Softmax (keys a
  mask drops set to −inf by Where), Transpose, Slice; an embedding is a Gather of the dequantized
  rows plus the dequantized position rows; an offset (class token, position embedding) is a Pad
  with zeros plus the dequantized constant.

Rounding: ONNX QuantizeLinear and QONNX Quant(rounding_mode="ROUND") round half to even; ptq
rounds half up (floor(x + 1/2)). They differ only on exact ties, and the graph carries float32
scales where the manifest has float64; both effects are measured (see tests/test_export.py) and
amount to rare one-code differences.

"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import ManifestError, OutputError
from ..manifest import Manifest, point_bits
from ..runtime.reference import dequantized_bias
from .onnxgraph import INPUT_NAME, QONNX_DOMAIN, GraphBuilder, slice_consts, torch_pads_to_onnx, weight_metadata, weight_name


class QdqBuilder(GraphBuilder):
    """The `qdq` (QuantizeLinear/DequantizeLinear, onnxruntime) and `qonnx` (Quant nodes) formats."""

    def __init__(self, m: Manifest, fmt: str = "qdq"):
        if fmt not in ("qdq", "qonnx"):
            raise OutputError(f"unknown float-semantics ONNX format '{fmt}'; use qdq or qonnx")
        super().__init__(m)
        self.fmt = fmt

    def const_int4(self, name: str, array: np.ndarray) -> str:
        """An INT4 initializer (two values per byte): 4-bit weights stored at their real size."""
        if name not in self._init_names:
            nib = (np.asarray(array).reshape(-1).astype(np.int64) & 0xF).astype(np.uint8)
            if nib.size % 2:
                nib = np.append(nib, np.uint8(0))
            packed = nib[0::2] | (nib[1::2] << 4)  # ONNX: the first element in the low nibble
            t = self.onnx.TensorProto(name=name, data_type=self.onnx.TensorProto.INT4, dims=list(np.shape(array)))
            t.raw_data = packed.tobytes()
            self.inits.append(t)
            self._init_names.add(name)
        return name

    # -- activation quantization --
    def quant(self, t: str, x: str, op: str, kind: str, clamp: list[int] | None = None) -> str:
        """Quantize float tensor x with the encoding of manifest tensor t; return t's float name."""
        e = self.m.encoding(t)
        bits, s, z = int(e["bits"]), float(e["scale"]), int(e["zero_point"])
        if bits > 16:
            raise ManifestError(f"tensor {t}: {bits}-bit activations cannot be exported (at most 16)")
        qmax = (1 << bits) - 1
        lo, hi = (0, qmax) if clamp is None else (int(clamp[0]), int(clamp[1]))
        store_max = 255 if bits <= 8 else 65535
        full = (0, store_max) if self.fmt == "qdq" else (0, qmax)
        if (lo, hi) != full:
            c = f"t/{t}/clip"
            self.node("Clip", [x, self.const(f"{t}/clip.lo", np.array(s * (lo - z), np.float32)),
                               self.const(f"{t}/clip.hi", np.array(s * (hi - z), np.float32))], [c],
                      f"{op}/clip:{t}", op, kind, {"ptq.tensor": t, "ptq.clamp": [lo, hi]})
            x = c
        scale = self.const(f"{t}/scale", np.array(s, np.float32))
        out = self.fname(t)
        tmeta = {"ptq.tensor": t, "ptq.act_bits": bits}
        if self.fmt == "qdq":
            zp = self.const(f"{t}/zero_point", np.array(z, np.uint8 if bits <= 8 else np.uint16))
            codes = f"t/{t}/q"
            self.node("QuantizeLinear", [x, scale, zp], [codes], f"{op}/quant:{t}", op, kind, tmeta)
            self.node("DequantizeLinear", [codes, scale, zp], [out], f"{op}/dequant:{t}", op, kind, tmeta)
            self.codes[t] = codes
        else:
            zp = self.const(f"{t}/zeropt", np.array(z, np.float32))
            bw = self.const(f"bitwidth{bits}", np.array(bits, np.float32))
            self.node("Quant", [x, scale, zp, bw], [out], f"{op}/quant:{t}", op, kind, tmeta,
                      domain=QONNX_DOMAIN, signed=0, narrow=0, rounding_mode="ROUND")
        return out

    def codes_of(self, t: str, op: str, kind: str) -> str:
        """int64 code tensor of t (for table lookups)."""
        if self.fmt == "qdq":
            c = f"t/{t}/q64"
            self.node("Cast", [self.codes[t]], [c], f"{op}/codes:{t}", op, kind, to=self.onnx.TensorProto.INT64)
            return c
        e = self.m.encoding(t)
        s, z = float(e["scale"]), int(e["zero_point"])
        base = f"{op}/codes:{t}"
        self.node("Div", [self.fname(t), self.const(f"{t}/scale", np.array(s, np.float32))], [base + "/div"],
                  base + "/div", op, kind)
        self.node("Add", [base + "/div", self.const(f"{t}/zeropt", np.array(z, np.float32))], [base + "/add"],
                  base + "/add", op, kind)
        self.node("Round", [base + "/add"], [base + "/round"], base + "/round", op, kind)
        self.node("Cast", [base + "/round"], [base + "/i64"], base + "/cast", op, kind, to=self.onnx.TensorProto.INT64)
        return base + "/i64"

    # -- weights --
    def weight_codes(self, name: str, q: np.ndarray, bits: int, zero_point: bool = False) -> tuple[str, str | None]:
        """The integer codes of one weight term as the narrowest initializer that holds them (INT4
        packed two per byte at <= 4 bits, else int8/int16/int32), and a zero zero-point of that type.
        QONNX stays at int8 and up: qonnx's executor hands initializers to onnxruntime as numpy
        arrays, and onnxruntime's Python binding refuses int4 arrays."""
        zshape = (q.shape[0],)
        if self.fmt == "qdq" and bits <= 4 and np.abs(q).max(initial=0) <= 7:
            return (self.const_int4(f"{name}.q", q),
                    self.const_int4(f"{name}.zero_point", np.zeros(zshape, np.int8)) if zero_point else None)
        qdt = np.int8 if bits <= 8 and q.dtype.itemsize <= 1 else np.int16 if q.dtype.itemsize <= 2 else np.int32
        return (self.const(f"{name}.q", q.astype(qdt)),
                self.const(f"{name}.zero_point", np.zeros(zshape, qdt)) if zero_point else None)

    def weight(self, rec: dict) -> str:
        name, kind = rec["name"], rec["kind"]
        parts = []
        terms = rec["weight"]["terms"]
        widths = point_bits(rec["weight"])
        for i, (term, bits) in enumerate(zip(terms, widths)):
            q = self.m.tensor(term["q"])
            s = np.asarray(self.m.tensor(term["scale"]), np.float64).reshape(-1)
            wname = weight_name(name, i)
            tmeta = {"ptq.role": "weight", "ptq.term": i}
            if self.fmt == "qdq":
                si = self.const(f"{wname}.scale", s.astype(np.float32))
                qi, zi = self.weight_codes(wname, q, bits, zero_point=True)
                self.node("DequantizeLinear", [qi, si, zi], [wname], f"{name}/dequant:w{i}", name, kind, tmeta, axis=0)
            else:
                # the codes are stored as integers (Cast, Mul by the scale: q·s in float32, which a
                # constant fold - qonnx's cleanup - turns into the usual float initializer of a Quant)
                qi, _ = self.weight_codes(wname, q, bits)
                si = self.const(f"{wname}.scale", s.reshape(-1, *([1] * (q.ndim - 1))).astype(np.float32))
                self.node("Cast", [qi], [f"{wname}.codes"], f"{name}/cast:w{i}", name, kind, tmeta,
                          to=self.onnx.TensorProto.FLOAT)
                self.node("Mul", [f"{wname}.codes", si], [f"{wname}.float"], f"{name}/scale:w{i}", name, kind, tmeta)
                zi = self.const(f"{wname}.zeropt", np.zeros((), np.float32))
                bw = self.const(f"bitwidth{bits}", np.array(bits, np.float32))
                self.node("Quant", [f"{wname}.float", si, zi, bw], [wname], f"{name}/quant:w{i}", name, kind,
                          tmeta, domain=QONNX_DOMAIN, signed=1, narrow=1, rounding_mode="ROUND")
            parts.append(wname)
        if len(parts) == 1:
            return parts[0]
        self.node("Sum", parts, [f"{name}/w"], f"{name}/sum_terms", name, kind, {"ptq.role": "weight"})
        return f"{name}/w"

    # -- ops: each emitter computes the op's float output; `emit` quantizes it with the output encoding --
    def emitters(self) -> dict[str, Callable[[dict], None]]:
        per_kind = {"conv": self._weighted, "linear": self._weighted, "add": self._add, "concat": self._concat,
                    "avgpool": self._avgpool, "maxpool": self._maxpool, "reshape": self._reshape,
                    "pad": self._pad, "clamp": self._clamp, "lut": self._lut, "matmul": self._matmul,
                    "scale": self._scale, "layernorm": self._layernorm, "softmax": self._softmax,
                    "permute": self._permute, "slice": self._slice, "embedding": self._embedding, "offset": self._offset}
        return {k: (lambda rec, f=f: self._emit(rec, f)) for k, f in per_kind.items()}

    def _emit(self, rec: dict, fn: Callable[[dict, list[str], str], str]) -> None:
        y = fn(rec, [self.fname(t) for t in rec["inputs"]], f"t/{rec['output']}/float")
        self.quant(rec["output"], y, rec["name"], rec["kind"], rec.get("clamp"))

    def _weighted(self, rec: dict, xs: list[str], y: str) -> str:
        name, kind, a = rec["name"], rec["kind"], rec["attrs"]
        w = self.weight(rec)
        b = self.const(f"{name}/bias", np.asarray(dequantized_bias(self.m, rec), np.float32))
        meta = weight_metadata(rec)
        if kind == "conv":
            ph, pw = a["padding"]
            kshape = list(rec["weight"]["shape"][2:])
            self.node("Conv", [xs[0], w, b], [y], name, name, kind, meta, kernel_shape=kshape,
                      strides=list(a["stride"]), pads=[ph, pw, ph, pw], dilations=list(a["dilation"]),
                      group=int(a["groups"]))
        elif len(a["out_shape"]) == 1:
            self.node("Gemm", [xs[0], w, b], [y], name, name, kind, meta, transB=1)
        else:  # (N, ..., K) inputs: Gemm takes matrices only
            self.node("Transpose", [w], [f"{name}/wT"], f"{name}/transpose:w", name, kind, perm=[1, 0])
            self.node("MatMul", [xs[0], f"{name}/wT"], [f"{name}/mm"], name, name, kind, meta)
            self.node("Add", [f"{name}/mm", b], [y], f"{name}/bias", name, kind)
        return y

    def _add(self, rec: dict, xs: list[str], y: str) -> str:
        self.node("Add", xs, [y], rec["name"], rec["name"], rec["kind"])
        return y

    def _concat(self, rec: dict, xs: list[str], y: str) -> str:
        self.node("Concat", xs, [y], rec["name"], rec["name"], rec["kind"], axis=int(rec["attrs"]["dim"]))
        return y

    def _avgpool(self, rec: dict, xs: list[str], y: str) -> str:
        name, kind, a = rec["name"], rec["kind"], rec["attrs"]
        if a.get("global"):
            self.node("GlobalAveragePool", xs, [y], name, name, kind)
        else:
            ph, pw = a["padding"]
            self.node("AveragePool", xs, [y], name, name, kind, kernel_shape=list(a["kernel"]),
                      strides=list(a["stride"]), pads=[ph, pw, ph, pw], count_include_pad=1)
        return y

    def _maxpool(self, rec: dict, xs: list[str], y: str) -> str:
        name, kind, a = rec["name"], rec["kind"], rec["attrs"]
        x = xs[0]
        ph, pw = a["padding"]
        if ph or pw:
            x = self.pad(rec, x, [0, 0, ph, pw, 0, 0, ph, pw], f"{name}/pad")
        self.node("MaxPool", [x], [y], name, name, kind, kernel_shape=list(a["kernel"]),
                  strides=list(a["stride"]), dilations=list(a["dilation"]), ceil_mode=int(bool(a["ceil_mode"])))
        return y

    def _reshape(self, rec: dict, xs: list[str], y: str) -> str:
        shape = self.const(f"{rec['name']}/shape", np.array([0, *rec["attrs"]["shape"]], np.int64))
        self.node("Reshape", [xs[0], shape], [y], rec["name"], rec["name"], rec["kind"])
        return y

    def _pad(self, rec: dict, xs: list[str], y: str) -> str:
        a = rec["attrs"]
        return self.pad(rec, xs[0], torch_pads_to_onnx(a["pads"], 1 + len(a["out_shape"])), rec["name"], out=y)

    def _clamp(self, rec: dict, xs: list[str], y: str) -> str:
        return xs[0]  # the clamp itself is the Clip in front of the output quantizer

    def _lut(self, rec: dict, xs: list[str], y: str) -> str:
        name, kind = rec["name"], rec["kind"]
        idx = self.codes_of(rec["inputs"][0], name, kind)
        e = self.m.encoding(rec["output"])
        table = np.asarray(self.m.tensor(rec["table"]), np.float64)
        deq = (e["scale"] * (table - e["zero_point"])).astype(np.float32)
        self.node("Gather", [self.const(f"{name}/table", deq), idx], [y], name, name, kind,
                  {"ptq.lut": rec["attrs"]["function"]}, axis=0)
        return y

    def _matmul(self, rec: dict, xs: list[str], y: str) -> str:
        name, kind = rec["name"], rec["kind"]
        self.node("MatMul", xs, [f"{name}/mm"], name, name, kind)
        self.node("Mul", [f"{name}/mm", self.const(f"{name}/alpha", np.array(rec["attrs"]["alpha"], np.float32))], [y],
                  f"{name}/alpha", name, kind)
        return y

    def _scale(self, rec: dict, xs: list[str], y: str) -> str:
        self.node("Mul", [xs[0], self.const(f"{rec['name']}/factor", np.array(rec["attrs"]["factor"], np.float32))], [y],
                  rec["name"], rec["name"], rec["kind"])
        return y

    def _layernorm(self, rec: dict, xs: list[str], y: str) -> str:
        name, r = rec["name"], rec["norm"]
        g, b = (self.const(f"{name}/{k}", np.asarray(self.m.tensor(r[k]), np.float32)) for k in ("gamma", "beta"))
        self.node("LayerNormalization", [xs[0], g, b], [y], name, name, rec["kind"], axis=-1,
                  epsilon=float(rec["attrs"]["eps"]))
        return y

    def _softmax(self, rec: dict, xs: list[str], y: str) -> str:
        name, kind = rec["name"], rec["kind"]
        x = xs[0]
        if len(xs) == 2:  # the keys the mask drops get −inf
            self.node("Equal", [xs[1], self.const("zero.f32", np.array(0.0, np.float32))], [f"{name}/dropped"],
                      f"{name}/dropped", name, kind)
            self.node("Where", [f"{name}/dropped", self.const("minus_inf.f32", np.array(-np.inf, np.float32)), xs[0]],
                      [f"{name}/masked"], f"{name}/mask", name, kind)
            x = f"{name}/masked"
        self.node("Softmax", [x], [y], name, name, kind, axis=-1)
        return y

    def _embedding(self, rec: dict, xs: list[str], y: str) -> str:
        name, kind, r = rec["name"], rec["kind"], rec["embedding"]
        s = float(self.m.encoding(rec["output"])["scale"])
        table, offset = (np.asarray(self.m.tensor(r[k]), np.float64) * s for k in ("table", "offset"))
        idx = self.codes_of(rec["inputs"][0], name, kind)
        self.node("Gather", [self.const(f"{name}/table", table.astype(np.float32)), idx], [f"{name}/rows"], name, name, kind, axis=0)
        self.node("Add", [f"{name}/rows", self.const(f"{name}/offset", offset.astype(np.float32))], [y], f"{name}/offset", name, kind)
        return y

    def _offset(self, rec: dict, xs: list[str], y: str) -> str:
        """Pad with zeros where the constant rows go, then Add the dequantized constant."""
        name, kind, a = rec["name"], rec["kind"], rec["attrs"]
        k = np.asarray(self.m.tensor(rec["offset"]), np.float64) * float(self.m.encoding(rec["output"])["scale"])
        self.node("Pad", [xs[0], self.const(f"{name}/pads", np.array(torch_pads_to_onnx(a["pads"], 1 + len(a["out_shape"])), np.int64)),
                          self.const("zero.f32", np.array(0.0, np.float32))], [f"{name}/padded"], f"{name}/pad", name, kind,
                  mode="constant")
        self.node("Add", [f"{name}/padded", self.const(f"{name}/offset", k.astype(np.float32))], [y], name, name, kind)
        return y

    def _permute(self, rec: dict, xs: list[str], y: str) -> str:
        self.node("Transpose", xs, [y], rec["name"], rec["name"], rec["kind"], perm=list(rec["attrs"]["perm"]))
        return y

    def _slice(self, rec: dict, xs: list[str], y: str) -> str:
        self.node("Slice", [xs[0], *slice_consts(self, rec)], [y], rec["name"], rec["name"], rec["kind"])
        return y

    def quantize_input(self) -> None:
        self.quant(self.m.graph["input"], INPUT_NAME, "input", "input")

    def output(self, t: str) -> tuple[str, int]:
        """Name and element type of graph output t (already dequantized by its quantizer pair)."""
        return self.fname(t), self.onnx.TensorProto.FLOAT

    def pad(self, rec: dict, x: str, pads: list[int], name: str, out: str | None = None) -> str:
        t = rec["inputs"][0]
        e = self.m.encoding(t)
        value = float(e["scale"]) * (int(rec["pad_value"]) - int(e["zero_point"]))
        out = out or f"{name}/out"
        self.node("Pad", [x, self.const(f"{name}/pads", np.array(pads, np.int64)),
                          self.const(f"{name}/value", np.array(value, np.float32))], [out], name,
                  rec["name"], rec["kind"], mode="constant")
        return out
