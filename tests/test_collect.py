"""Calibration statistics (calib/collect.py): the input patches every output error is built on."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptq.calib.collect import layer_patches


@pytest.mark.parametrize("c,o,k,s,p,d,g", [(8, 16, 3, 1, 1, 1, 1), (8, 8, 3, 2, 1, 1, 8), (6, 12, 1, 1, 0, 1, 1),
                                           (4, 8, 5, 2, 2, 2, 2), (4, 4, 3, 1, 0, 1, 1)])
def test_patches_are_the_unfolded_input_of_each_group(c, o, k, s, p, d, g):
    op = SimpleNamespace(kind="conv", weight=np.zeros((o, c // g, k, k)),
                         attrs={"stride": (s, s), "padding": (p, p), "dilation": (d, d), "groups": g})
    x = torch.randn(3, c, 11, 12)
    got = layer_patches(op, x, None, None)  # every output position
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C·k·k, L), channel-major like a group's K
    want = cols.reshape(3, g, (c // g) * k * k, -1).permute(1, 0, 3, 2).reshape(g, -1, (c // g) * k * k)
    assert torch.equal(got, want)
    # sampled positions are a subset of those rows, the same for the same generator
    a = layer_patches(op, x, 7, torch.Generator().manual_seed(3))
    b = layer_patches(op, x, 7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (g, 3 * min(7, want.shape[1] // 3), want.shape[2])
    rows = {tuple(r.tolist()) for r in want[0]}
    assert all(tuple(r.tolist()) in rows for r in a[0])


@pytest.mark.parametrize("positions", [None, 9])
def test_a_depthwise_layer_s_moments_taken_a_few_groups_at_a_time_are_those_of_all_its_patches(monkeypatch, positions):
    import ptq.calib.collect as collect
    op = SimpleNamespace(kind="conv", weight=torch.zeros(20, 1, 3, 3), attrs={"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 20})
    op.weight_matrix_shape = (20, 9)
    x = torch.randn(4, 20, 9, 10)
    whole = collect.moments_of(layer_patches(op, x, positions, torch.Generator().manual_seed(5)))
    monkeypatch.setattr(collect, "PART_ELEMENTS", 1)  # parts of 8, 8 and 4 groups
    parts = collect.patch_moments(op, x, positions, torch.Generator().manual_seed(5))
    assert np.array_equal(parts.xx, whole.xx) and np.array_equal(parts.x, whole.x) and parts.count == whole.count == 4 * (positions or 25)
    p = layer_patches(op, x, positions, torch.Generator().manual_seed(5)).double()
    assert np.allclose(parts.xx, (p.transpose(1, 2) @ p).numpy(), rtol=1e-5, atol=1e-4)
