"""Vision transformers and nn.TransformerEncoder through the integer contract: nn.MultiheadAttention
swapped for explicit ops at capture, scaled_dot_product_attention decomposed, the class token and
position embedding as one `offset` op; quantize → simulate → verify, the integer twin bit-exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ptq
from ptq.errors import UnsupportedOpError
from ptq.export import onnxruntime_runner
from ptq.ir.capture import capture
from ptq.ir.floatops import run_float


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()))


def tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer, 32×32 images, two layers 32 wide; the class token and the head
    (both zero-initialised by torchvision) drawn at random so that neither is trivially zero."""
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    with torch.no_grad():
        m.class_token.normal_(0, 0.5)
        m.heads.head.weight.normal_(0, 0.2)
    return m.eval()


class TinyTransformer(nn.Module):
    """A user's nn.TransformerEncoder (batch_first, GELU, two layers) on (T, F) features."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.enc(self.inp(x))[:, 0])


def _data(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(size=(64, *shape)).astype(np.float32)
    return x[:32], x[32:]


@pytest.fixture(scope="module")
def vit_quantized():
    model = tiny_vit()
    calib, held_out = _data((3, 32, 32))
    return model, held_out, ptq.quantize(model, calib, "w8a8", eval_size=0, overrides={"calibration.sensitivity_samples": 0})


@pytest.fixture(scope="module")
def encoder_quantized():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    calib, held_out = _data((10, 8))
    return model, held_out, ptq.quantize(model, calib, "w8a8", eval_size=0, overrides={"calibration.sensitivity_samples": 0})


def _verified_and_twins(model: nn.Module, x: np.ndarray, qm, min_sqnr: float) -> None:
    ver = qm.manifest.data["verification"]
    assert ver["structural"]["ok"] and ver["numeric"]["ok"] and ver["numeric"]["max_lsb_error"] <= 1
    xt = torch.from_numpy(x)
    sim = qm.simulate(xt)
    with torch.no_grad():
        assert sqnr_db(model(xt).numpy(), sim) >= min_sqnr
    assert np.array_equal(onnxruntime_runner(qm.manifest, fmt="int")(xt), sim)
    assert sqnr_db(sim, onnxruntime_runner(qm.manifest)(xt)) >= 40.0


# Measured (2026-12-04, 32 calibration and 32 held-out inputs): simulator vs FP32 logits 29.4 dB; QDQ twin vs
# simulator 46.3 dB.
def test_tiny_vit_quantize_simulate_verify(vit_quantized):
    model, x, qm = vit_quantized
    m = qm.manifest
    kinds = [op["kind"] for op in m.ops]
    assert {"conv", "offset", "layernorm", "matmul", "softmax", "lut", "slice"} <= set(kinds)
    # the class token and the position embedding are one op: its first row holds token + position 0
    cls = next(op for op in m.ops if op["kind"] == "offset")
    assert kinds.count("offset") == 1 and cls["attrs"]["pads"] == [0, 0, 1, 0]
    s = m.encoding(cls["output"])["scale"]
    want = (model.class_token[0, 0] + model.encoder.pos_embedding[0, 0]).detach().numpy()
    assert np.abs(m.tensor(cls["offset"])[0] * s - want).max() <= s / 2 + 1e-9
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj" in {op["name"] for op in m.weighted_ops()}
    _verified_and_twins(model, x, qm, 26.0)


# Measured (2026-12-04): simulator vs FP32 28.6 dB; QDQ twin vs simulator 61.2 dB.
def test_transformer_encoder_quantize_simulate_verify(encoder_quantized):
    model, x, qm = encoder_quantized
    assert isinstance(model.enc.layers[0].self_attn, nn.MultiheadAttention)  # the swap is undone after capture
    assert sum(op["kind"] == "softmax" for op in qm.manifest.ops) == 2
    _verified_and_twins(model, x, qm, 25.0)


class _MeanPooled(TinyTransformer):
    """The same encoder with its tokens mean-pooled (`x.mean(1)`) before the head."""

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


def test_mean_pooling_over_tokens():
    """`x.mean(1)` on (N, T, D) becomes a permute, a view and the global average pool (no new integer
    op); the pooled model verifies and its integer twin is exact."""
    torch.manual_seed(0)
    model = _MeanPooled().eval()
    calib, held_out = _data((10, 8))
    g = capture(model, (10, 8))
    pool = next(op for op in g.ops if op.kind == "avgpool")
    assert pool.attrs["global"] and pool.attrs["out_shape"] == [32, 1, 1]
    with torch.no_grad():
        xt = torch.from_numpy(held_out)
        assert np.abs(run_float(g, xt).numpy() - model(xt).numpy()).max() < 1e-5
    qm = ptq.quantize(model, calib, "w8a8", eval_size=0, overrides={"calibration.sensitivity_samples": 0})
    _verified_and_twins(model, held_out, qm, 25.0)


class _Sdpa(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.qkv, self.kw = nn.Linear(8, 24), kw

    def forward(self, x):
        q, k, v = (p.unsqueeze(1) for p in self.qkv(x).split(8, dim=-1))
        return F.scaled_dot_product_attention(q, k, v, **self.kw).flatten(1)


def test_scaled_dot_product_attention_is_decomposed():
    model = _Sdpa(scale=0.3).eval()
    g = capture(model, (5, 8))
    steps = [(op.kind, op.attrs.get("alpha")) for op in g.ops if op.kind in ("permute", "matmul", "softmax")]
    assert steps == [("permute", None), ("matmul", 0.3), ("softmax", None), ("matmul", 1.0)]
    x = torch.randn(4, 5, 8)
    assert torch.allclose(run_float(g, x), model(x), atol=1e-6)


class _Constants(nn.Module):
    """A constant added after a linear (its own `offset` op), then a token appended and a broadcast
    constant added (folded into one second `offset` op)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.shift = nn.Parameter(torch.randn(1, 1, 8))

    def forward(self, x):
        n = x.shape[0]
        h = torch.cat([self.fc(x) + self.pos, self.token.expand(n, -1, -1)], dim=1)
        return h + self.shift.expand(n, -1, -1)


def test_constants_become_offset_ops():
    model = _Constants().eval()
    g = capture(model, (5, 8))
    offsets = [op for op in g.ops if op.kind == "offset"]
    assert [op.attrs["pads"] for op in offsets] == [[0, 0, 0, 0], [0, 0, 0, 1]]
    assert offsets[1].params["offset"].shape == (6, 8)
    x = torch.randn(3, 5, 8)
    assert torch.allclose(run_float(g, x), model(x), atol=1e-6)


class _Cross(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.a(x)
        return self.b(y, x, x)[0]


class _SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)

    def forward(self, x):
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize("model, fragment", [
    (_SeqFirst(), "nn.MultiheadAttention 'attn' has batch_first=False, so the batch is not the first dimension; "
                  "build it (or nn.TransformerEncoderLayer) with batch_first=True"),
    (_Cross(), "nn.MultiheadAttention 'b' is called with different query, key and value (cross-attention)"),
    (_Sdpa(is_causal=True), "scaled_dot_product_attention with a mask, causal masking, dropout or grouped query heads is not supported (<top>)"),
])
def test_attention_outside_the_contract_is_refused_by_name(model, fragment):
    with pytest.raises(UnsupportedOpError) as exc:
        capture(model.eval(), (5, 8))
    assert fragment in str(exc.value)
    assert all(isinstance(m, nn.MultiheadAttention) for m in model.modules() if "Attention" in type(m).__name__)
