"""A manifest's encodings in the AIMET encodings JSON layout, version 0.6.1: the file Qualcomm's AIMET
exports beside an ONNX model and the QNN/SNPE converters read (`--quantization_overrides`).

Layout (quic/aimet, Docs/api_docs/quantization_encoding_specification.rst, section "Version 0.6.1"):
`activation_encodings` and `param_encodings` map a tensor name to a list of encodings, one per
channel for a per-channel weight; each encoding has `bitwidth`, `dtype` ("int"), `is_symmetric`
("True"/"False"), `scale`, `offset`, `min`, `max`, with real = (code + offset) · scale for unsigned
codes 0..2^bitwidth − 1, so min = offset · scale and max = (offset + 2^bitwidth − 1) · scale.
`quantizer_args` is left out: it is debugging information AIMET fills from its QuantSim settings
(one activation width, one parameter width, its calibration scheme), which a mixed-precision
manifest has no single value for. A top-level `ptq` entry records the manifest's hash.

Tensor names are those of the QDQ export (`ptq export --format qdq`), so the file applies to that
ONNX model: an activation is keyed by the output of its DequantizeLinear (`t/<tensor>`, or `output`),
a weight by the Conv/Gemm weight input (`<layer>/w0`). Biases have no entry: ptq's int32 bias sits at
s_x · s_w, the scale QNN gives a 32-bit bias itself.

What maps exactly: activations (offset = −zero point) and every one-term weight - uniform, bit-plane
and SWIS layers are stored as integers on a symmetric b-bit grid per channel, so the uniform b-bit
encoding holds every value (bit-plane and SWIS lose their cycle savings, not their values; weights
narrower than the format's 4-bit minimum are written at 4 bits, the same values). A multipoint layer
with several points sums terms at independent scales, which no single affine grid holds: it is
refused with the layer's name. Activations narrower than 4 bits are refused too (a wider grid
would clip later, not the same values)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ManifestError
from ..intmath import qmax
from ..manifest import Manifest
from ..manifest.publish import write_file
from ..version import __version__
from .onnxgraph import float_name, output_names, weight_name

AIMET_VERSION = "0.6.1"
MIN_BITWIDTH = 4  # the specification's lower bound for `bitwidth`


def _entry(bits: int, scale: float, offset: int, symmetric: bool) -> dict[str, Any]:
    return {"bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric), "scale": scale, "offset": offset,
            "min": scale * offset, "max": scale * (offset + (1 << bits) - 1)}


def activation_encodings(m: Manifest) -> dict[str, list[dict[str, Any]]]:
    """One asymmetric encoding per tensor: the graph input and every op's output."""
    names = output_names(m)
    out = {}
    for t in [m.graph["input"], *(rec["output"] for rec in m.ops)]:
        e = m.encoding(t)
        bits = int(e["bits"])
        if bits < MIN_BITWIDTH:
            raise ManifestError(f"tensor {t}: {bits}-bit activations are below the AIMET encodings' {MIN_BITWIDTH}-bit "
                                "minimum; export --format qdq or --format int instead")
        out[float_name(names, t)] = [_entry(bits, float(e["scale"]), -int(e["zero_point"]), False)]
    return out


def param_encodings(m: Manifest) -> dict[str, list[dict[str, Any]]]:
    """One symmetric encoding per output channel of each weighted layer; multi-term weights refused."""
    out = {}
    for rec in m.weighted_ops():
        w, name = rec["weight"], rec["name"]
        if len(w["terms"]) != 1:
            raise ManifestError(f"layer {name}: {w['scheme']} weights with {len(w['terms'])} terms at their own scales "
                                "have no AIMET encoding (one affine grid per channel); export --format qdq or --format qonnx instead")
        term = w["terms"][0]
        bits = max(int(w["bits"]), MIN_BITWIDTH)
        q = m.tensor(term["q"])
        if q.size and (int(q.min()) < -(1 << (bits - 1)) or int(q.max()) > qmax(bits)):
            raise ManifestError(f"layer {name}: weight codes exceed the {bits}-bit grid its record declares")
        scales = np.asarray(m.tensor(term["scale"]), np.float64).reshape(-1)
        out[weight_name(name)] = [_entry(bits, float(s), -(1 << (bits - 1)), True) for s in scales]
    return out


def aimet_encodings(m: Manifest) -> dict[str, Any]:
    """The AIMET 0.6.1 encodings document of manifest m."""
    return {"version": AIMET_VERSION, "activation_encodings": activation_encodings(m),
            "param_encodings": param_encodings(m),
            "ptq": {"manifest_sha256": m.hash(), "version": __version__, "names": "ptq export --format qdq"}}


def _written_by_ptq(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("ptq"), dict) and "manifest_sha256" in data["ptq"]


def save_aimet(m: Manifest, path: str | Path) -> Path:
    """Write the encodings atomically; an existing file is replaced only if ptq wrote it."""
    blob = (json.dumps(aimet_encodings(m), indent=1, sort_keys=True) + "\n").encode()
    return write_file(path, blob, _written_by_ptq, "an encodings file")
