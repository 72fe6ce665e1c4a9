"""What moved all-MiniLM-L6-v2 to its fidelity targets (BENCHMARKS.md, Transformers), on tiny models:
calibration statistics over kept tokens only."""
from __future__ import annotations

import numpy as np
import torch

from ptq.calib.collect import collect_statistics
from ptq.calib.sources import DataSource
from ptq.calib.tokens import kept_tokens
from ptq.ir import execute
from ptq.ir.capture import capture
from ptq.ir.floatops import float_kernels


def _source(x: np.ndarray) -> DataSource:
    return DataSource("in-memory array", "tensor", len(x), lambda a, b: x[a:b])


def test_calibration_statistics_ignore_padded_positions():
    """Other token ids at the padded positions change the hidden states there, but not one
    statistic of a per-token tensor, nor any layer's input moments H."""
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
    for name in per_token:
        assert s.ranges[name] == t.ranges[name] and np.array_equal(s.histograms[name].counts, t.histograms[name].counts)
    assert s.layer_inputs.keys() == t.layer_inputs.keys()
    for name, st in s.layer_inputs.items():
        assert st.count == t.layer_inputs[name].count == int(x[..., 1].sum())
        assert np.array_equal(st.xx, t.layer_inputs[name].xx)


def test_graphs_without_a_masked_softmax_keep_every_position(tiny_encoder):
    model, shape, _, _ = tiny_encoder
    assert kept_tokens(capture(model, shape)) is None
