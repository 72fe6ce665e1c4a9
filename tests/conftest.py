"""Shared fixtures: the benchmark's small CNN trained on scikit-learn digits (real labelled data)."""
from __future__ import annotations

import os

import pytest

from benchmarks.digits import digits_data, train
from ptq.memory import reuse_freed_memory

os.environ.setdefault("PTQ_NO_PROGRESS", "1")
reuse_freed_memory()  # as `ptq`'s command line runs: the tests' tensors reused, not mapped afresh


def _share_the_cores() -> None:
    """Each pytest-xdist worker takes its share of torch's threads: two workers at the default
    thread count each ran the suite in 4 min 4 s on 2 cores, at one thread each in 3 min 4 s to 3 min 28 s."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


_share_the_cores()


@pytest.fixture(scope="session")
def digits():
    """(model, x_train, y_train, x_test, y_test) with the model trained for a few seconds."""
    xtr, ytr, xte, yte = digits_data()
    return train(), xtr, ytr, xte, yte


@pytest.fixture(scope="session")
def digits_quantized(digits, tmp_path_factory):
    """The digits model quantized W8A8 and saved; (QuantizedModel, directory)."""
    import ptq
    model, xtr, ytr, xte, yte = digits
    qm = ptq.quantize(model, xtr[:256], "w8a8", eval_data=xte[:128])
    out = tmp_path_factory.mktemp("q") / "digits-w8a8"
    qm.save(out)
    return qm, out


class TinyEncoder:
    """Built lazily (torch is imported by the fixtures): a one-block post-LN transformer encoder
    written as BERT writes it — packed q/k/v Linear split into heads, scores q·kᵀ/√d, softmax, context,
    output projection, residual add, LayerNorm, a tanh-GELU FFN scaled by a constant, residual,
    LayerNorm — on float token features (T, F), with a per-token classifier head."""

    @staticmethod
    def build(tokens: int = 8, features: int = 16, d: int = 32, heads: int = 4, ffn: int = 64, classes: int = 4):
        import math

        import torch
        from torch import nn

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.inp = nn.Linear(features, d)
                self.qkv = nn.Linear(d, 3 * d)
                self.o = nn.Linear(d, d)
                self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
                self.f1, self.f2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
                self.head = nn.Linear(d, classes)

            def split_heads(self, x):
                n, t, _ = x.shape
                return x.view(n, t, heads, d // heads).transpose(1, 2)

            def forward(self, x):
                x = self.inp(x)
                q, k, v = (self.split_heads(p) for p in self.qkv(x).split(d, dim=-1))
                a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads), dim=-1)
                c = (a @ v).transpose(1, 2).reshape(x.shape)
                x = self.ln1(x + self.o(c))
                x = self.ln2(x + self.f2(nn.functional.gelu(self.f1(x), approximate="tanh")) * 0.5)
                return self.head(x).flatten(1)

        torch.manual_seed(0)
        return Encoder().eval(), (tokens, features)


@pytest.fixture(scope="session")
def tiny_encoder():
    """(model, input shape, calibration (64, T, F), held-out inputs (64, T, F))."""
    import numpy as np
    model, shape = TinyEncoder.build()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, *shape)).astype(np.float32)
    return model, shape, x[:64], x[64:]


@pytest.fixture(scope="session")
def tiny_encoder_w8a8(tiny_encoder):
    """The tiny encoder quantized with the shipped w8a8 recipe."""
    import ptq
    model, _, calib, _ = tiny_encoder
    return ptq.quantize(model, calib, "w8a8", overrides={"calibration.sensitivity_samples": 0})


def tiny_bert():
    """A BERT-style encoder on packed (T, 2) inputs (token ids, attention mask), as ptq.minilm
    writes all-MiniLM-L6-v2 but 32 wide with one layer: embedding + position rows, LayerNorm,
    masked attention, exact-GELU FFN; and (N, T, 2) inputs with 3..T kept tokens."""
    import numpy as np
    import torch
    from torch import nn

    class Layer(nn.Module):
        def __init__(self, d=32, heads=4):
            super().__init__()
            self.d, self.heads = d, heads
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.n1, self.n2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
            self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def split(self, x):
            n, t, _ = x.shape
            return x.view(n, t, self.heads, self.d // self.heads).transpose(1, 2)

        def forward(self, h, keep):
            s = self.split(self.q(h)) @ self.split(self.k(h)).transpose(-2, -1) / (self.d // self.heads) ** 0.5
            a = torch.softmax(s.masked_fill(keep == 0, float("-inf")), dim=-1)
            h = self.n1(h + self.o((a @ self.split(self.v(h))).transpose(1, 2).reshape(h.shape)))
            return self.n2(h + self.f2(nn.functional.gelu(self.f1(h))))

    class Bert(nn.Module):
        def __init__(self, vocab=50, tokens=12, d=32):
            super().__init__()
            self.word = nn.Embedding(vocab, d)
            self.position = nn.Parameter(torch.randn(tokens, d) * 0.1)
            self.norm = nn.LayerNorm(d, eps=1e-12)
            self.layer = Layer(d)

        def forward(self, x):
            n, t, _ = x.shape
            h = self.norm(self.word(x[..., 0].long()) + self.position)
            return self.layer(h, x[..., 1].reshape(n, 1, 1, t))

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = np.zeros((96, 12, 2), np.float32)
    for i, length in enumerate(rng.integers(3, 13, 96)):
        x[i, :length, 0] = rng.integers(1, 50, length)
        x[i, :length, 1] = 1
    return Bert().eval(), x
