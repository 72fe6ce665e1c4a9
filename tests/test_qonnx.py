"""The QONNX twin checked by the qonnx package itself: its cleanup (constant folding, shape inference,
renaming) and its node-by-node executor reproduce ptq's integer simulator for every weight scheme."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import ptq
from ptq.export import export_qonnx

pytest.importorskip("qonnx", reason="the qonnx package is not installed (pip install -e '.[check]')")
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.util.cleanup import cleanup_model  # noqa: E402

from test_export import sqnr_db  # noqa: E402

# Measured (qonnx 1.0.0, onnxruntime 1.32, 300 digits test images vs the simulator): top-1 agreement 1.000
# for every recipe; logit SQNR w8a8 108.6 dB, w4a8 117.6, multipoint 111.6, swis 75.6, bitplane 75.2 dB
# (swis and bitplane: one sample of 300 carries a one-code flip upstream, float32 near a tie).
RECIPES = {"w8a8": ("uniform", 95.0), "w4a8": ("uniform", 95.0), "multipoint": ("multipoint", 95.0),
           "swis": ("swis", 65.0), "bitplane": ("uniform", 65.0)}


@pytest.fixture(scope="module", params=list(RECIPES))
def quantized(request, digits, digits_quantized):
    if request.param == "w8a8":
        return request.param, digits_quantized[0]
    model, xtr, *_ = digits
    return request.param, ptq.quantize(model, xtr[:256], request.param)


def run_qonnx(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """qonnx's own path: ModelWrapper, cleanup at batch len(x), execute_onnx."""
    w = cleanup_model(ModelWrapper(model), override_inpsize=len(x))
    return execute_onnx(w, {w.graph.input[0].name: x})[w.graph.output[0].name].astype(np.float64)


def test_qonnx_executor_reproduces_the_simulator(quantized, digits):
    name, qm = quantized
    scheme, min_sqnr = RECIPES[name]
    assert {op["weight"]["scheme"] for op in qm.manifest.weighted_ops()} == {scheme}
    if name == "bitplane":
        assert all("bitplanes" in op["weight"] for op in qm.manifest.weighted_ops())
    x = digits[3][:300]
    out = run_qonnx(export_qonnx(qm.manifest), x)
    sim = qm.simulate(torch.from_numpy(x))
    assert out.shape == sim.shape
    assert float((out.argmax(1) == sim.argmax(1)).mean()) >= 0.99
    assert sqnr_db(sim, out) >= min_sqnr
    s = qm.manifest.encoding(qm.manifest.graph["outputs"][0])["scale"]
    assert float((np.abs(out - sim) > 1.5 * s).any(axis=1).mean()) <= 0.01


def test_qonnx_weights_are_stored_as_integers(quantized):
    """Each term's codes are an int8 (or wider) initializer, never a float copy of the weight; qonnx's
    cleanup folds Cast and Mul into the float input its Quant nodes expect."""
    _, qm = quantized
    model = export_qonnx(qm.manifest)
    inits = {i.name: i for i in model.graph.initializer}
    for rec in qm.manifest.weighted_ops():
        for i, term in enumerate(rec["weight"]["terms"]):
            init = inits[f"{rec['name']}/w{i}.q"]
            assert init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32)
            assert np.array_equal(onnx.numpy_helper.to_array(init), qm.manifest.tensor(term["q"]))
    sizes = {int(np.prod(r["weight"]["shape"])) for r in qm.manifest.weighted_ops()}
    assert not [i.name for i in model.graph.initializer
                if i.data_type == onnx.TensorProto.FLOAT and int(np.prod(i.dims)) in sizes]
    clean = cleanup_model(ModelWrapper(model), override_inpsize=1)
    types = {n.op_type for n in clean.graph.node}
    assert "Cast" not in types and "Quant" in types
    weight_quants = [n for n in clean.graph.node if n.op_type == "Quant" and clean.get_initializer(n.input[0]) is not None]
    assert len(weight_quants) == sum(len(r["weight"]["terms"]) for r in qm.manifest.weighted_ops())
