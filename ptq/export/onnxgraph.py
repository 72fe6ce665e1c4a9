"""What every ONNX format of a manifest shares: the graph builder (naming, initializers, nodes with
ptq.* metadata, the walk over the manifest's ops through a per-kind emitter table), the metadata
written on the model and on weighted nodes, and reading that metadata back.

IR version: pinned to 10 (ONNX 1.16), the first IR with `metadata_props` on nodes and the one
that introduced opset 21. onnxruntime 1.31 accepts IR <= 13; 10 keeps older runtimes working.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np

from ..errors import OutputError
from ..ir import require_all
from ..manifest import Manifest, weight_summary
from ..version import __version__

OPSET = 21
IR_VERSION = 10
QONNX_DOMAIN = "qonnx.custom_op.general"
FORMATS = ("qdq", "qonnx", "int")
INPUT_NAME = "input"
GRAPH_DOC = "ONNX export of a manifest: a QDQ twin for onnxruntime and a QONNX twin for FINN-style toolchains."
# metadata keys whose values are kept as strings when read back (everything else is JSON)
STRING_KEYS = {"ptq.op", "ptq.kind", "ptq.scheme", "ptq.accumulator_mode", "ptq.version", "ptq.recipe",
               "ptq.manifest_sha256", "ptq.format", "ptq.tensor", "ptq.role", "ptq.rounding", "ptq.lut"}


def onnx_module():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a dependency of the export extra
        raise OutputError("ONNX export needs the 'onnx' package (pip install onnx)") from exc
    return onnx


def meta_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def parse_meta(key: str, v: str) -> Any:
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


def torch_pads_to_onnx(pads: list[int], rank: int) -> list[int]:
    """torch F.pad order (last dim first, (begin, end) pairs) -> ONNX [begins..., ends...]."""
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pads) // 2):
        d = rank - 1 - i
        begins[d], ends[d] = int(pads[2 * i]), int(pads[2 * i + 1])
    return begins + ends


def output_names(m: Manifest) -> dict[str, str]:
    """The ONNX name of each graph output: `output`, or `output0`, `output1`, ... for several."""
    outs = m.graph["outputs"]
    return {t: ("output" if len(outs) == 1 else f"output{i}") for i, t in enumerate(outs)}


def float_name(out_names: dict[str, str], t: str) -> str:
    """The ONNX name of manifest tensor t's (dequantized) float value in the qdq/qonnx graphs."""
    return out_names.get(t, f"t/{t}")


def weight_name(op: str, term: int = 0) -> str:
    """The ONNX name of weight term `term` of op `op`, dequantized (the Conv/Gemm weight of a one-term layer)."""
    return f"{op}/w{term}"


def slice_consts(b: "GraphBuilder", rec: dict) -> list[str]:
    """The starts, ends, axes and steps inputs of the ONNX Slice of a `slice` op."""
    a, name = rec["attrs"], rec["name"]
    return [b.const(f"{name}/{k}", np.array([a[f]], np.int64))
            for k, f in (("starts", "start"), ("ends", "end"), ("axes", "dim"), ("steps", "step"))]


def _out_shape(g: dict, t: str) -> list[int] | None:
    if t == g["input"]:
        return list(g["input_shape"])
    for rec in g["ops"]:
        if rec["output"] == t:
            return rec["attrs"].get("out_shape")
    return None


def model_metadata(m: Manifest, fmt: str) -> dict[str, str]:
    r = m.data.get("recipe", {})
    meta = {"ptq.manifest_sha256": m.hash(), "ptq.version": __version__, "ptq.recipe": r.get("name", ""),
            "ptq.mean_weight_bits": weight_summary(m)["mean_weight_bits"], "ptq.format": fmt,
            "ptq.manifest_version": m.data.get("version"),
            "ptq.rounding": "half-up (integer twin: the simulator's arithmetic)" if fmt == "int"
            else "half-up in ptq; half-even in ONNX Quantize/Quant",
            "ptq.outputs": list(m.graph["outputs"]), "ptq.input": m.graph["input"]}
    return {k: meta_value(v) for k, v in meta.items() if v is not None}




class GraphBuilder(ABC):
    """Builds one ONNX graph from a manifest. A format subclasses it and supplies `emitters()` (one
    per op kind of the op table), `quantize_input()` and `output()`."""

    fmt = ""

    def __init__(self, m: Manifest):
        self.onnx = onnx_module()
        self.m = m
        self.nodes: list = []
        self.inits: list = []
        self._init_names: set[str] = set()
        self.codes: dict[str, str] = {}  # tensor -> name of its integer code tensor
        self.out_names = output_names(m)

    def shape_of(self, t: str) -> list[int]:
        """Per-sample shape of manifest tensor t."""
        return _out_shape(self.m.graph, t)

    # -- naming --
    def fname(self, t: str) -> str:
        """The (dequantized) float value of manifest tensor t."""
        return float_name(self.out_names, t)

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self._init_names:
            self.inits.append(self.onnx.numpy_helper.from_array(np.require(array, requirements="C"), name))
            self._init_names.add(name)
        return name

    def node(self, op_type: str, inputs: list[str], outputs: list[str], name: str, op: str, kind: str,
             meta: dict[str, Any] | None = None, domain: str = "", **attrs):
        n = self.onnx.helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs)
        entries = {"ptq.op": op, "ptq.kind": kind, **(meta or {})}
        for k, v in entries.items():
            n.metadata_props.add(key=k, value=meta_value(v))
        self.nodes.append(n)
        return n

    # -- the format's part --
    @abstractmethod
    def emitters(self) -> dict[str, Callable[[dict], None]]:
        """One emitter per op kind of the op table; each appends the nodes of one manifest op."""

    @abstractmethod
    def quantize_input(self) -> None:
        """Nodes that turn the float graph input into the input tensor's codes."""

    @abstractmethod
    def output(self, t: str) -> tuple[str, int]:
        """Name and element type of graph output t."""

    def build(self):
        onnx = self.onnx
        h = onnx.helper
        g = self.m.graph
        emit = require_all(f"onnx-{self.fmt}", self.emitters())
        self.quantize_input()
        for rec in g["ops"]:
            emit[rec["kind"]](rec)
        inp = h.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["N", *g["input_shape"]])
        outs = []
        for t in g["outputs"]:
            shape = _out_shape(g, t)
            name, elem = self.output(t)
            outs.append(h.make_tensor_value_info(name, elem, ["N", *shape] if shape is not None else None))
        graph = h.make_graph(self.nodes, f"ptq:{self.m.data.get('model', {}).get('name', 'model')}", [inp], outs,
                             self.inits, doc_string=GRAPH_DOC)
        opsets = [h.make_opsetid("", OPSET)]
        if self.fmt == "qonnx":
            opsets.append(h.make_opsetid(QONNX_DOMAIN, 1))
        model = h.make_model(graph, opset_imports=opsets, producer_name="ptq", producer_version=__version__)
        model.ir_version = IR_VERSION
        h.set_model_props(model, model_metadata(self.m, self.fmt))
        return model


def load_onnx(path: Any):
    """The ONNX model in file `path` (external data not loaded); one OutputError naming `path` when
    it is missing, unreadable or not an ONNX model."""
    from google.protobuf.message import DecodeError
    onnx = onnx_module()
    fix = "give a model.onnx written by `ptq export` or a manifest directory"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise OutputError(f"{path} does not exist; {fix}") from None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {(exc.strerror or str(exc)).lower()}; {fix}") from exc
    except DecodeError:
        model = None
    if model is None or not model.HasField("graph"):
        raise OutputError(f"{path} is not an ONNX model; {fix}")
    return model


def read_ptq_metadata(model_or_path: Any) -> dict[str, Any]:
    """ptq.* metadata of an exported model: {'model': {...}, 'nodes': [...], 'layers': {op: {...}}}.

    `layers` holds the weight entries of each weighted op (from its Conv/Gemm node), typed as in
    the manifest (ints, floats, booleans, strings).
    """
    onnx = onnx_module()
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else load_onnx(model_or_path)
    out: dict[str, Any] = {"model": {p.key: parse_meta(p.key, p.value) for p in model.metadata_props if p.key.startswith("ptq.")},
                           "ir_version": model.ir_version,
                           "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
                           "nodes": [], "layers": {}}
    for n in model.graph.node:
        meta = {p.key: parse_meta(p.key, p.value) for p in n.metadata_props if p.key.startswith("ptq.")}
        out["nodes"].append({"name": n.name, "op_type": n.op_type, "domain": n.domain, "ptq": meta})
        if "ptq.scheme" in meta and meta["ptq.op"] not in out["layers"]:  # Conv/Gemm, or the int twin's first term
            out["layers"][meta["ptq.op"]] = {"kind": meta.get("ptq.kind"), "op_type": n.op_type,
                                             **{k[4:]: v for k, v in meta.items() if k not in ("ptq.op", "ptq.kind", "ptq.term")}}
    return out


