"""ONNX twins of a manifest: `qdq` (QuantizeLinear/DequantizeLinear, float semantics, for
onnxruntime), `qonnx` (QONNX Quant nodes) and `int` (the integer program, bit for bit in
onnxruntime); and its encodings in the AIMET JSON layout (`aimet`, keyed by the qdq graph's tensor
names). Built from the manifest alone; imports the manifest and runtime, never a method."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import OutputError
from ..manifest import Manifest
from ..manifest.publish import write_file
from .aimet import AIMET_VERSION, aimet_encodings, save_aimet
from .integer import IntegerBuilder
from .onnxgraph import (FORMATS, INPUT_NAME, IR_VERSION, OPSET, QONNX_DOMAIN, onnx_module, read_ptq_metadata,
                        weight_metadata)
from .qdq import QdqBuilder


def export(manifest: Manifest, fmt: str = "qdq", check: bool = True):
    """The manifest as an onnx.ModelProto in format `qdq`, `qonnx` or `int`, checked by onnx.checker."""
    if fmt not in FORMATS:
        raise OutputError(f"unknown ONNX format '{fmt}'; use one of {', '.join(FORMATS)}")
    model = (IntegerBuilder(manifest) if fmt == "int" else QdqBuilder(manifest, fmt)).build()
    if check:
        onnx = onnx_module()
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


def _onnx_written_by_ptq(path: Path) -> bool:
    """Whether the ONNX file at `path` is one of ptq's exports (its producer is ptq)."""
    onnx = onnx_module()
    try:
        return onnx.load(str(path), load_external_data=False).producer_name == "ptq"
    except Exception:  # noqa: BLE001 - any file onnx cannot parse is not ours, whatever onnx raises
        return False


def save_onnx(model, path: str | Path) -> Path:
    """Write the model atomically (temporary file in the same directory, then rename); a failed
    write is one OutputError naming `path`, and the previous file stays as it was. An existing file
    is replaced only if ptq wrote it."""
    return write_file(path, model.SerializeToString(), _onnx_written_by_ptq, "an ONNX file")


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


__all__ = ["export", "export_qdq", "export_qonnx", "save_onnx", "aimet_encodings", "save_aimet", "AIMET_VERSION", "onnxruntime_runner", "onnxruntime_session",
           "read_ptq_metadata", "weight_metadata", "IR_VERSION", "OPSET", "QONNX_DOMAIN"]
