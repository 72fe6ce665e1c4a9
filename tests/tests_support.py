"""Importable helpers for tests that save modules with torch.save (pickle needs a module path)."""
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(nn.functional.relu(self.conv(x)).flatten(1))


def tiny_model() -> nn.Module:
    import torch
    torch.manual_seed(0)
    return Tiny().eval()
