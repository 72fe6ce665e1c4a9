"""A small CNN trained on scikit-learn digits: the benchmark's model with real labels (accuracy).

The tests use the same model (`tests/conftest.py` imports it).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


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


def digits_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): 1400 / 397 images (N, 1, 8, 8) in [-0.5, 0.5]."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.5)[:, None]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(x))
    tr, te = idx[:1400], idx[1400:]
    return x[tr], y[tr], x[te], y[te]


def train(epochs: int = 40, seed: int = 0) -> DigitsNet:
    """Adam, batch 64, lr 3e-3; a few seconds on one core; the same weights for a seed on any machine:
    trained on one thread, since torch's reductions sum in an order set by the thread count, and 40
    epochs grow those last bits into a different model (one whose bounds the tests were not measured on)."""
    torch.manual_seed(seed)
    xtr, ytr, _, _ = digits_data()
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(xt))
            for i in range(0, len(xt), 64):
                b = perm[i:i + 64]
                opt.zero_grad()
                nn.functional.cross_entropy(model(xt[b]), yt[b]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
