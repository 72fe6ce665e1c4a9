"""AIMET encodings JSON export: read back, it matches the manifest's scales, offsets and bitwidths,
and its tensor names are the QDQ export's, carrying the same scales and zero points."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import ptq
from ptq.export import AIMET_VERSION, aimet_encodings, export_qdq

from test_outputs import cli


@pytest.fixture(scope="module")
def w4a8_dir(digits, tmp_path_factory):
    model, xtr, *_ = digits
    qm = ptq.quantize(model, xtr[:128], "w4a8", overrides={"calibration.verify_size": 16})
    return qm.save(tmp_path_factory.mktemp("aimet") / "digits-w4a8")


@pytest.fixture(params=["w8a8", "w4a8"])
def saved(request, digits_quantized, w4a8_dir):
    return request.param, (digits_quantized[1] if request.param == "w8a8" else w4a8_dir)


def test_encodings_round_trip_the_manifest(saved, tmp_path):
    recipe, directory = saved
    out = tmp_path / "model.encodings"
    code, msg = cli("export", str(directory), "--format", "aimet", "--out", str(out))
    assert code == 0, msg
    doc = json.loads(out.read_text())
    m = ptq.load(directory).manifest
    assert doc["version"] == AIMET_VERSION == "0.6.1" and doc["ptq"]["manifest_sha256"] == m.hash()
    acts, params = doc["activation_encodings"], doc["param_encodings"]
    tensors = [m.graph["input"], *(r["output"] for r in m.ops)]
    assert len(acts) == len(tensors)
    for t in tensors:
        e = m.encoding(t)
        [enc] = acts["output" if t in m.graph["outputs"] else f"t/{t}"]
        assert (enc["bitwidth"], enc["scale"], enc["offset"]) == (e["bits"], e["scale"], -e["zero_point"])
        assert enc["dtype"] == "int" and enc["is_symmetric"] == "False"
        assert enc["min"] == pytest.approx(-e["zero_point"] * e["scale"], rel=1e-12)
        assert enc["max"] == pytest.approx(((1 << e["bits"]) - 1 - e["zero_point"]) * e["scale"], rel=1e-12)
    widths = set()
    assert len(params) == len(m.weighted_ops())
    for rec in m.weighted_ops():
        [term] = rec["weight"]["terms"]
        scales, q = m.tensor(term["scale"]).reshape(-1), m.tensor(term["q"]).astype(np.int64)
        encs = params[f"{rec['name']}/w0"]
        assert len(encs) == len(scales) == rec["weight"]["shape"][0]
        for c, (enc, s) in enumerate(zip(encs, scales)):
            assert (enc["bitwidth"], enc["scale"]) == (rec["weight"]["bits"], float(s))
            assert enc["offset"] == -(1 << (enc["bitwidth"] - 1)) and enc["is_symmetric"] == "True"
            assert enc["min"] == pytest.approx(enc["offset"] * s) and enc["max"] == pytest.approx(-(enc["offset"] + 1) * s)
            codes = q[c] - enc["offset"]  # AIMET's unsigned codes of this channel: all on the grid
            assert codes.min() >= 0 and codes.max() <= (1 << enc["bitwidth"]) - 1
            widths.add(enc["bitwidth"])
    assert widths == ({8} if recipe == "w8a8" else {4, 8})


def test_names_and_values_are_the_qdq_exports(saved):
    """Each activation key is a DequantizeLinear output of the QDQ model with the same scale and zero
    point; each parameter key is a Conv/Gemm weight input, dequantized with the same per-channel scales."""
    _, directory = saved
    m = ptq.load(directory).manifest
    doc = aimet_encodings(m)
    model = export_qdq(m)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weights = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert set(doc["param_encodings"]) == weights
    assert set(doc["activation_encodings"]) == set(dq) - weights
    for name, [enc] in doc["activation_encodings"].items():
        node = dq[name]
        assert inits[node.input[1]] == np.float32(enc["scale"]) and int(inits[node.input[2]]) == -enc["offset"]
    for name, encs in doc["param_encodings"].items():
        node = dq[name]
        assert np.array_equal(inits[node.input[1]], np.float32([e["scale"] for e in encs]))
        assert not np.any(inits[node.input[2]])


def test_multipoint_is_refused_naming_the_scheme(digits, tmp_path):
    model, xtr, *_ = digits
    directory = ptq.quantize(model, xtr[:64], "multipoint", overrides={"calibration.verify_size": 8}).save(tmp_path / "mp")
    out = tmp_path / "mp.encodings"
    code, msg = cli("export", str(directory), "--format", "aimet", "--out", str(out))
    assert code == 2 and "multipoint weights with" in msg and "terms at their own scales have no AIMET encoding" in msg
    assert "export --format qdq or --format qonnx instead" in msg
    assert not out.exists()


def test_a_file_ptq_did_not_write_is_not_overwritten(digits_quantized, tmp_path):
    target = tmp_path / "model.encodings"
    target.write_text('{"version": "0.6.1", "activation_encodings": {}, "param_encodings": {}}\n')
    before = target.read_bytes()
    code, msg = cli("export", str(digits_quantized[1]), "--format", "aimet", "--out", str(target))
    assert code == 2 and f"output file {target} exists and is not an encodings file written by ptq" in msg
    assert target.read_bytes() == before
    mine = tmp_path / "mine.encodings"
    for _ in range(2):  # ptq's own file is replaced
        assert cli("export", str(digits_quantized[1]), "--format", "aimet", "--out", str(mine))[0] == 0
    assert json.loads(mine.read_text())["ptq"]["manifest_sha256"] == ptq.load(digits_quantized[1]).manifest.hash()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.encodings", "model.encodings"]
