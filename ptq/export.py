"""ONNX export of a manifest: a QDQ twin for onnxruntime and a QONNX twin for FINN-style toolchains.

The graph is built from the manifest alone (never by re-tracing torch) and computes the float
fake-quant semantics of `ptq.reference`:

- every activation tensor t is quantized with its manifest encoding: QuantizeLinear ->
  DequantizeLinear (uint8 codes for <= 8 bits, uint16 for 9..16 bits). Encodings narrower than
  the storage type, and fused activation clamps, are realised by a Clip in front of the
  QuantizeLinear whose bounds are the dequantized clamp codes s*(lo - z), s*(hi - z). Because
  quantization is monotone this equals clamping the codes, as the reference does.
- weights are int4 (packed two per byte, at most 4 bits), int8 (int16/int32 above 8 bits) initializers with per-output-channel
  DequantizeLinear (axis 0, zero point 0). A weight with several terms (multipoint,
  w = sum_t scale_t * q_t) is dequantized term by term and the terms are summed (one `Sum` node)
  before a single Conv/Gemm: onnxruntime runs this as one float convolution, which is the
  reference's arithmetic (one GEMM on the dequantized weight).
- biases are float: the int32 bias dequantized at s_x·scale_0 (bias correction included), added by the
  Conv/Gemm.
- lookup tables (`lut`) are evaluated exactly as the integer program does: the input codes index
  the table. In the QDQ graph the uint codes of the input QuantizeLinear are cast to int64 and
  gathered from the dequantized table s_y*(table - z_y); the result is re-quantized with the
  output encoding (exact: every table value is on the output grid). In the QONNX graph, which has
  no code tensors, the codes are recovered as Round(x/s + z) first.
- pad / maxpool padding use the record's `pad_value` code, in the float domain s*(pad_value - z).

Rounding: ONNX QuantizeLinear and QONNX Quant(rounding_mode="ROUND") round half to even; ptq
rounds half up (floor(x + 1/2)). They differ only on exact ties, and the graph carries float32
scales where the manifest has float64; both effects are measured (see tests/test_export.py) and
amount to rare one-code differences.

IR version: pinned to 10 (ONNX 1.16), the first IR with `metadata_props` on nodes and the one
that introduced opset 21. onnxruntime 1.31 accepts IR <= 13; 10 keeps older runtimes working.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import ManifestError, OutputError
from .manifest import Manifest
from .methods.multipoint import point_bits
from .reference import dequantized_bias

OPSET = 21
IR_VERSION = 10
QONNX_DOMAIN = "qonnx.custom_op.general"
FORMATS = ("qdq", "qonnx", "int")
INPUT_NAME = "input"
# metadata keys whose values are kept as strings when read back (everything else is JSON)
STRING_KEYS = {"ptq.op", "ptq.kind", "ptq.scheme", "ptq.accumulator_mode", "ptq.version", "ptq.recipe",
               "ptq.manifest_sha256", "ptq.format", "ptq.tensor", "ptq.role", "ptq.rounding", "ptq.lut"}


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a dependency of the export extra
        raise OutputError("ONNX export needs the 'onnx' package (pip install onnx)") from exc
    return onnx


def _meta_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _parse_meta(key: str, v: str) -> Any:
    if key in STRING_KEYS:
        return v
    try:
        return json.loads(v)
    except (json.JSONDecodeError, ValueError):
        return v


def weight_metadata(rec: dict) -> dict[str, Any]:
    """The ptq.* entries of a weighted op, from its manifest record.

    Every scalar field of the weight scheme is carried (scheme, bits, points, group size, shared
    bits, the `bitplanes` record as JSON, ...), each extra tensor of the scheme by its reference in the manifest's
    tensor file (e.g. a SWIS layer's group shifts), and the accumulator's width, mode and bounds.
    """
    w, acc = rec["weight"], rec.get("accumulator", {})
    meta: dict[str, Any] = {f"ptq.{k}": v for k, v in sorted(w.items())
                            if k not in ("shape", "terms", "extra") and _scalar_or_list(v)}
    meta["ptq.terms"] = len(w["terms"])
    meta.update({f"ptq.{k}_ref": v for k, v in sorted(w.get("extra", {}).items())})
    meta.update({f"ptq.accumulator_{k}" if not k.startswith("data_free") else f"ptq.{k}": v
                 for k, v in sorted(acc.items()) if _scalar_or_list(v)})
    meta["ptq.bias_corrected"] = bool(rec.get("bias", {}).get("corrected", False))
    return {k: v for k, v in meta.items() if v is not None}


def _scalar_or_list(v: Any) -> bool:
    """Scalars, flat lists and records of them (e.g. a layer's `bitplanes` info) travel as JSON."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _scalar_or_list(e) and not isinstance(e, dict) for k, e in v.items())
    return isinstance(v, (str, int, float, bool)) or (isinstance(v, list) and all(isinstance(e, (str, int, float, bool)) for e in v))


def _torch_pads_to_onnx(pads: list[int], rank: int) -> list[int]:
    """torch F.pad order (last dim first, (begin, end) pairs) -> ONNX [begins..., ends...]."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):
        d = rank - 1 - i
        begins[d], ends[d] = int(pads[2 * i]), int(pads[2 * i + 1])
    return begins + ends


class _Builder:
    def __init__(self, m: Manifest, fmt: str):
        if fmt not in FORMATS:
            raise OutputError(f"unknown ONNX format '{fmt}'; use one of {', '.join(FORMATS)}")
        self.onnx = _onnx()
        self.m = m
        self.fmt = fmt
        self.nodes: list = []
        self.inits: list = []
        self._init_names: set[str] = set()
        self.codes: dict[str, str] = {}  # tensor -> name of its uint code tensor (qdq only)
        outs = m.graph["outputs"]
        self.out_names = {t: ("output" if len(outs) == 1 else f"output{i}") for i, t in enumerate(outs)}

    # -- naming --
    def fname(self, t: str) -> str:
        """The (dequantized) float value of manifest tensor t."""
        return self.out_names.get(t, f"t/{t}")

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self._init_names:
            self.inits.append(self.onnx.numpy_helper.from_array(np.require(array, requirements="C"), name))
            self._init_names.add(name)
        return name

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

    def node(self, op_type: str, inputs: list[str], outputs: list[str], name: str, op: str, kind: str,
             meta: dict[str, Any] | None = None, domain: str = "", **attrs):
        n = self.onnx.helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs)
        entries = {"ptq.op": op, "ptq.kind": kind, **(meta or {})}
        for k, v in entries.items():
            n.metadata_props.add(key=k, value=_meta_value(v))
        self.nodes.append(n)
        return n

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
    def weight(self, rec: dict) -> str:
        name, kind = rec["name"], rec["kind"]
        parts = []
        terms = rec["weight"]["terms"]
        widths = point_bits(rec["weight"])
        for i, (term, bits) in enumerate(zip(terms, widths)):
            q = self.m.tensor(term["q"])
            s = np.asarray(self.m.tensor(term["scale"]), np.float64).reshape(-1)
            wname = f"{name}/w{i}"
            if self.fmt == "qdq":
                si = self.const(f"{wname}.scale", s.astype(np.float32))
                if bits <= 4 and np.abs(q).max(initial=0) <= 7:
                    qi = self.const_int4(f"{wname}.q", q)
                    zi = self.const_int4(f"{wname}.zero_point", np.zeros(s.shape, np.int8))
                else:
                    qdt = np.int8 if bits <= 8 and q.dtype.itemsize <= 1 else np.int16 if q.dtype.itemsize <= 2 else np.int32
                    qi = self.const(f"{wname}.q", q.astype(qdt))
                    zi = self.const(f"{wname}.zero_point", np.zeros(s.shape, qdt))
                self.node("DequantizeLinear", [qi, si, zi], [wname], f"{name}/dequant:w{i}", name, kind,
                          {"ptq.role": "weight", "ptq.term": i}, axis=0)
            else:
                view = s.reshape(-1, *([1] * (q.ndim - 1)))
                wf = self.const(f"{wname}.float", (q.astype(np.float64) * view).astype(np.float32))
                si = self.const(f"{wname}.scale", view.astype(np.float32))
                zi = self.const(f"{wname}.zeropt", np.zeros((), np.float32))
                bw = self.const(f"bitwidth{bits}", np.array(bits, np.float32))
                self.node("Quant", [wf, si, zi, bw], [wname], f"{name}/quant:w{i}", name, kind,
                          {"ptq.role": "weight", "ptq.term": i}, domain=QONNX_DOMAIN, signed=1, narrow=1,
                          rounding_mode="ROUND")
            parts.append(wname)
        if len(parts) == 1:
            return parts[0]
        self.node("Sum", parts, [f"{name}/w"], f"{name}/sum_terms", name, kind, {"ptq.role": "weight"})
        return f"{name}/w"

    # -- ops --
    def emit(self, rec: dict) -> None:
        name, kind, a = rec["name"], rec["kind"], rec["attrs"]
        xs = [self.fname(t) for t in rec["inputs"]]
        y = f"t/{rec['output']}/float"
        clamp = rec.get("clamp")
        if kind in ("conv", "linear"):
            w = self.weight(rec)
            b = self.const(f"{name}/bias", np.asarray(dequantized_bias(self.m, rec), np.float32))
            meta = weight_metadata(rec)
            if kind == "conv":
                ph, pw = a["padding"]
                kshape = list(rec["weight"]["shape"][2:])
                self.node("Conv", [xs[0], w, b], [y], name, name, kind, meta, kernel_shape=kshape,
                          strides=list(a["stride"]), pads=[ph, pw, ph, pw], dilations=list(a["dilation"]),
                          group=int(a["groups"]))
            else:
                self.node("Gemm", [xs[0], w, b], [y], name, name, kind, meta, transB=1)
        elif kind == "add":
            self.node("Add", xs, [y], name, name, kind)
        elif kind == "concat":
            self.node("Concat", xs, [y], name, name, kind, axis=int(a["dim"]))
        elif kind == "avgpool":
            if a.get("global"):
                self.node("GlobalAveragePool", xs, [y], name, name, kind)
            else:
                ph, pw = a["padding"]
                self.node("AveragePool", xs, [y], name, name, kind, kernel_shape=list(a["kernel"]),
                          strides=list(a["stride"]), pads=[ph, pw, ph, pw], count_include_pad=1)
        elif kind == "maxpool":
            x = xs[0]
            ph, pw = a["padding"]
            if ph or pw:
                x = self.pad(rec, x, [0, 0, ph, pw, 0, 0, ph, pw], f"{name}/pad")
            self.node("MaxPool", [x], [y], name, name, kind, kernel_shape=list(a["kernel"]),
                      strides=list(a["stride"]), dilations=list(a["dilation"]), ceil_mode=int(bool(a["ceil_mode"])))
        elif kind == "reshape":
            shape = self.const(f"{name}/shape", np.array([0, *a["shape"]], np.int64))
            self.node("Reshape", [xs[0], shape], [y], name, name, kind)
        elif kind == "pad":
            rank = 1 + len(a["out_shape"])
            self.pad(rec, xs[0], _torch_pads_to_onnx(a["pads"], rank), name, out=y)
        elif kind == "clamp":
            y = xs[0]  # the clamp itself is the Clip in front of the output quantizer
        elif kind == "lut":
            t = rec["inputs"][0]
            idx = self.codes_of(t, name, kind)
            e = self.m.encoding(rec["output"])
            table = np.asarray(self.m.tensor(rec["table"]), np.float64)
            deq = (e["scale"] * (table - e["zero_point"])).astype(np.float32)
            self.node("Gather", [self.const(f"{name}/table", deq), idx], [y], name, name, kind,
                      {"ptq.lut": a["function"]}, axis=0)
        else:
            raise ManifestError(f"op {name}: kind '{kind}' cannot be exported to ONNX")
        self.quant(rec["output"], y, name, kind, clamp)

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

    def build(self):
        onnx = self.onnx
        h = onnx.helper
        g = self.m.graph
        self.quantize_input()
        for rec in g["ops"]:
            self.emit(rec)
        inp = h.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["N", *g["input_shape"]])
        outs = []
        for t in g["outputs"]:
            shape = _out_shape(g, t)
            name, elem = self.output(t)
            outs.append(h.make_tensor_value_info(name, elem, ["N", *shape] if shape is not None else None))
        graph = h.make_graph(self.nodes, f"ptq:{self.m.data.get('model', {}).get('name', 'model')}", [inp], outs,
                             self.inits, doc_string=__doc__.split("\n\n")[0])
        opsets = [h.make_opsetid("", OPSET)]
        if self.fmt == "qonnx":
            opsets.append(h.make_opsetid(QONNX_DOMAIN, 1))
        model = h.make_model(graph, opset_imports=opsets, producer_name="ptq", producer_version=_version())
        model.ir_version = IR_VERSION
        h.set_model_props(model, model_metadata(self.m, self.fmt))
        return model


def _out_shape(g: dict, t: str) -> list[int] | None:
    if t == g["input"]:
        return list(g["input_shape"])
    for rec in g["ops"]:
        if rec["output"] == t:
            return rec["attrs"].get("out_shape")
    return None


def _version() -> str:
    from . import __version__
    return __version__


def model_metadata(m: Manifest, fmt: str) -> dict[str, str]:
    from .card import weight_summary
    r = m.data.get("recipe", {})
    meta = {"ptq.manifest_sha256": m.hash(), "ptq.version": _version(), "ptq.recipe": r.get("name", ""),
            "ptq.mean_weight_bits": weight_summary(m)["mean_weight_bits"], "ptq.format": fmt,
            "ptq.manifest_version": m.data.get("version"),
            "ptq.rounding": "half-up (integer twin: the simulator's arithmetic)" if fmt == "int"
            else "half-up in ptq; half-even in ONNX Quantize/Quant",
            "ptq.outputs": list(m.graph["outputs"]), "ptq.input": m.graph["input"]}
    return {k: _meta_value(v) for k, v in meta.items() if v is not None}


def export(manifest: Manifest, fmt: str = "qdq", check: bool = True):
    """The manifest as an onnx.ModelProto in format `qdq`, `qonnx` or `int`, checked by onnx.checker."""
    if fmt == "int":
        from .export_int import IntBuilder
        model = IntBuilder(manifest, fmt).build()
    else:
        model = _Builder(manifest, fmt).build()
    if check:
        onnx = _onnx()
        try:
            onnx.checker.check_model(model, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise OutputError(f"the exported {fmt} graph fails the ONNX checker: {exc}") from exc
    return model


def export_qdq(manifest: Manifest, check: bool = True):
    """Standard QuantizeLinear/DequantizeLinear graph (opset 21, IR 10) that onnxruntime runs."""
    return export(manifest, "qdq", check)


def export_qonnx(manifest: Manifest, check: bool = True):
    """The same graph with QONNX `Quant` nodes (domain qonnx.custom_op.general) instead of QDQ pairs."""
    return export(manifest, "qonnx", check)


def save_onnx(model, path: str | Path) -> Path:
    """Write the model atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = model.SerializeToString()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


LEVELS = ("disable", "basic", "extended", "all")


def onnxruntime_session(model, level: str = "basic", threads: int = 1):
    """An onnxruntime CPU session on `model` at graph optimization `level`.

    The default, "basic", folds constants but keeps the QDQ pairs, so onnxruntime computes the
    float fake-quant semantics (agreement with the simulator: rare 1-code tie differences).
    "extended"/"all" let onnxruntime fuse DQ->Conv->Q into QLinearConv and friends; on x86 CPUs
    without VNNI its u8s8 kernels saturate 16-bit pair sums (u8 activations x s8 weights using the
    full +-127 range), which changes results by many codes - use those levels only for speed
    measurements, or on VNNI hardware.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover
        raise OutputError("backend 'onnxruntime' needs the 'onnxruntime' package (pip install onnxruntime)") from exc
    if level not in LEVELS:
        raise OutputError(f"onnxruntime optimization level must be one of {', '.join(LEVELS)}; got {level!r}")
    L = ort.GraphOptimizationLevel
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = {"disable": L.ORT_DISABLE_ALL, "basic": L.ORT_ENABLE_BASIC,
                                   "extended": L.ORT_ENABLE_EXTENDED, "all": L.ORT_ENABLE_ALL}[level]
    blob = model if isinstance(model, (bytes, str)) else model.SerializeToString()
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def onnxruntime_runner(manifest: Manifest, level: str = "basic", threads: int = 1,
                       fmt: str = "qdq") -> Callable[[Any], np.ndarray]:
    """A callable x (N, C, H, W) -> dequantized first output (float64 numpy), run by onnxruntime on
    the QDQ twin (float semantics) or the `int` twin (the simulator's integers, bit for bit)."""
    if fmt not in ("qdq", "int"):
        raise OutputError(f"onnxruntime runs the 'qdq' or 'int' format, not {fmt!r}")
    sess = onnxruntime_session(export(manifest, fmt, check=False), level, threads)
    out = sess.get_outputs()[0].name

    def run(x: Any) -> np.ndarray:
        arr = x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x, np.float32)
        return sess.run([out], {INPUT_NAME: np.ascontiguousarray(arr, np.float32)})[0].astype(np.float64)

    return run


def read_ptq_metadata(model_or_path: Any) -> dict[str, Any]:
    """ptq.* metadata of an exported model: {'model': {...}, 'nodes': [...], 'layers': {op: {...}}}.

    `layers` holds the weight entries of each weighted op (from its Conv/Gemm node), typed as in
    the manifest (ints, floats, booleans, strings).
    """
    onnx = _onnx()
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path), load_external_data=False)
    out: dict[str, Any] = {"model": {p.key: _parse_meta(p.key, p.value) for p in model.metadata_props if p.key.startswith("ptq.")},
                           "ir_version": model.ir_version,
                           "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
                           "nodes": [], "layers": {}}
    for n in model.graph.node:
        meta = {p.key: _parse_meta(p.key, p.value) for p in n.metadata_props if p.key.startswith("ptq.")}
        out["nodes"].append({"name": n.name, "op_type": n.op_type, "domain": n.domain, "ptq": meta})
        if "ptq.scheme" in meta and meta["ptq.op"] not in out["layers"]:  # Conv/Gemm, or the int twin's first term
            out["layers"][meta["ptq.op"]] = {"kind": meta.get("ptq.kind"), "op_type": n.op_type,
                                             **{k[4:]: v for k, v in meta.items() if k not in ("ptq.op", "ptq.kind", "ptq.term")}}
    return out


__all__ = ["export", "export_qdq", "export_qonnx", "save_onnx", "onnxruntime_runner", "onnxruntime_session",
           "read_ptq_metadata", "weight_metadata", "IR_VERSION", "OPSET", "QONNX_DOMAIN"]
