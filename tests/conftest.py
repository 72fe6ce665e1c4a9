"""Shared fixtures: a small CNN trained on scikit-learn digits (real labelled data)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("PTQ_NO_PROGRESS", "1")


class DigitsNet(nn.Module):
    """Covers conv+BN+ReLU, ReLU6, max-pool, a residual add, global pooling, flatten and linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                                  nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24))
        self.skip = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = torch.relu(self.body(x) + self.skip(x))
        x = nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def digits_data():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="session")
def digits():
    """(model, x_train, y_train, x_test, y_test) with the model trained for a few seconds."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_data()
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for epoch in range(40):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            b = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()
    model.eval()
    return model, xtr, ytr, xte, yte


@pytest.fixture(scope="session")
def digits_quantized(digits, tmp_path_factory):
    """The digits model quantized W8A8 and saved; (QuantizedModel, directory)."""
    import ptq
    model, xtr, ytr, xte, yte = digits
    qm = ptq.quantize(model, xtr[:256], "w8a8", eval_data=xte[:128])
    out = tmp_path_factory.mktemp("q") / "digits-w8a8"
    qm.save(out)
    return qm, out
