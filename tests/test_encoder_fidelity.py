"""What moved all-MiniLM-L6-v2 to its fidelity targets (BENCHMARKS.md, Transformers), on tiny models:
calibration statistics over kept tokens only, and the wider GEMM inputs of an encoder
(`encoder.gemm_input_bits`) with their accumulator bound, in the simulator and the integer twin."""
from __future__ import annotations

import numpy as np
import torch

import ptq
from ptq.calib.collect import collect_statistics
from ptq.calib.sources import DataSource
from ptq.calib.tokens import kept_tokens
from ptq.export import export, onnxruntime_runner
from ptq.ir import execute
from ptq.ir.capture import capture
from ptq.ir.floatops import float_kernels
from ptq.recipe import resolve


def _source(x: np.ndarray) -> DataSource:
    return DataSource("in-memory array", "tensor", len(x), lambda a, b: x[a:b])


def test_calibration_statistics_ignore_padded_positions():
    """Other token ids at the padded positions change the hidden states there, but not one
    statistic an encoding is chosen from (every requantizing op's output), nor any layer's input
    moments H."""
    from conftest import tiny_bert
    model, x = tiny_bert()
    g = capture(model, x.shape[1:])
    other = x.copy()
    other[..., 0] = np.where(x[..., 1] == 0, 7, x[..., 0])
    assert torch.equal(kept_tokens(g)(torch.from_numpy(x)), torch.from_numpy(x[..., 1] == 1))
    per_token = [op.output for op in g.ops if len(op.attrs["out_shape"]) == 2]  # (T, C) per sample
    a, b = (execute(g, torch.from_numpy(v), float_kernels(), keep=per_token) for v in (x, other))
    assert any(not torch.equal(a[t], b[t]) for t in per_token)  # the padded rows do differ
    s, t = (collect_statistics(g, _source(v), batch_size=32) for v in (x, other))
    sources = set(g.encoding_source().values()) - {g.input}
    assert len(sources) == 16 and {"matmul", "softmax"} <= {g.producers()[t].kind for t in sources}
    for name in sources:
        assert s.ranges[name] == t.ranges[name] and np.array_equal(s.histograms[name].counts, t.histograms[name].counts)
    assert s.layer_inputs.keys() == t.layer_inputs.keys()
    for name, st in s.layer_inputs.items():
        assert st.count == t.layer_inputs[name].count == int(x[..., 1].sum())
        assert np.array_equal(st.xx, t.layer_inputs[name].xx)


def test_padding_changes_no_bias_correction():
    """Bias correction measures each layer's shift, and `auto` its candidates, at kept tokens only:
    other ids at the padded positions give the same corrected biases and the same choice."""
    from conftest import tiny_bert
    model, x = tiny_bert()
    other = x.copy()
    other[..., 0] = np.where(x[..., 1] == 0, 7, x[..., 0])
    over = {"calibration.sensitivity_samples": 0, "weights.bits": 4, "weights.rounding": "nearest",
            "calibration.verify_size": 8}
    ms = [ptq.quantize(model, v[:48], "w8a8", eval_size=0, overrides=over).manifest for v in (x, other)]
    assert ms[0].data["bias_correction"] == ms[1].data["bias_correction"]
    assert ms[0].data["bias_correction"]["chosen"] != "none" and ms[0].data["bias_correction"]["corrected"]
    for a, b in zip(ms[0].weighted_ops(), ms[1].weighted_ops()):
        assert np.array_equal(ms[0].tensor(a["bias"]["q"]), ms[1].tensor(b["bias"]["q"]))


def test_graphs_without_a_masked_softmax_keep_every_position(tiny_encoder):
    model, shape, _, _ = tiny_encoder
    assert kept_tokens(capture(model, shape)) is None


def _gemm_fed(m, kinds):
    """Tensors produced by ops of `kinds` that a linear layer reads."""
    made = {op["output"] for op in m.ops if op["kind"] in kinds}
    return {op["inputs"][0] for op in m.weighted_ops()} & made


def test_encoder_gemm_inputs_are_wider_and_keep_their_accumulator_bound(tiny_encoder_w8a8):
    """LayerNorm and GELU outputs that feed a linear layer get 12 bits (the default); the GELU's
    input (a lookup table's) stays at 8; every layer's data-free bound still fits 32 bits."""
    m = tiny_encoder_w8a8.manifest
    assert m.data["recipe"]["encoder"] == {"gemm_input_bits": 12}
    fed = _gemm_fed(m, ("layernorm", "lut"))
    assert len(fed) == 3 and {m.encoding(t)["bits"] for t in fed} == {12}
    lut_in = {op["inputs"][0] for op in m.ops if op["kind"] == "lut"}
    assert {m.encoding(t)["bits"] for t in lut_in} == {8}
    for op in m.weighted_ops():
        acc = op["accumulator"]
        assert acc["bound"] in ("data-type", "weight-level") and acc["data_free_bits"] <= acc["bits"] == 32
    assert m.data["verification"]["structural"]["ok"]


def test_16_bit_gemm_inputs_run_exactly_in_the_integer_twin(tiny_encoder):
    """At 16 bits the float32 accumulation of the integer twin is no longer provably exact (bound
    ≥ 2^24): those linear layers accumulate in float64, and the twin still equals the simulator."""
    model, _, calib, held_out = tiny_encoder
    qm = ptq.quantize(model, calib, "w8a8", eval_size=0,
                      overrides={"calibration.sensitivity_samples": 0, "encoder.gemm_input_bits": 16})
    m = qm.manifest
    assert {m.encoding(t)["bits"] for t in _gemm_fed(m, ("layernorm", "lut"))} == {16}
    assert max(op["accumulator"]["data_free_max"] for op in m.weighted_ops()) >= 2**24
    assert m.data["verification"]["structural"]["ok"] and m.data["verification"]["numeric"]["max_lsb_error"] <= 1
    casts = {a.i for n in export(m, "int").graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert 11 in casts  # TensorProto.DOUBLE
    x = torch.from_numpy(held_out)
    assert np.array_equal(onnxruntime_runner(m, fmt="int")(x), qm.simulate(x))


def test_gemm_input_bits_8_restores_8_bit_gemm_inputs(tiny_encoder):
    model, _, calib, _ = tiny_encoder
    qm = ptq.quantize(model, calib, "w8a8", eval_size=0,
                      overrides={"calibration.sensitivity_samples": 0, "encoder.gemm_input_bits": 8})
    m = qm.manifest
    assert {m.encoding(t)["bits"] for t in _gemm_fed(m, ("layernorm", "lut"))} == {8}


def test_a_cnn_manifest_records_no_encoder_section(digits_quantized):
    """[encoder] applies only to graphs with LayerNorm: a CNN's manifest does not carry it (its bytes
    stay those of a recipe without the section), while the resolved recipe has it."""
    qm, _ = digits_quantized
    assert "encoder" not in qm.manifest.data["recipe"] and resolve("w8a8")["encoder"] == {"gemm_input_bits": 12}
    assert {e["bits"] for e in qm.manifest.graph["encodings"].values()} <= {8, 16}
