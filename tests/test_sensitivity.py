"""Per-channel Fisher sensitivity: matches the closed form on a linear classifier, zero where unused."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ptq.calib.sensitivity import channel_fisher
from ptq.ir.capture import capture


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_fisher_of_the_logits_is_p_times_one_minus_p():
    """For the logit layer, E_y~p[(p_k − 1[y=k])²] = p_k(1 − p_k): the sampled estimate converges to it."""
    torch.manual_seed(0)
    model = TwoLayer().eval()
    g = capture(model, (6,))
    x = torch.randn(1, 6).repeat(4000, 1)
    f = channel_fisher(g, x.split(500), seed=0)
    logits_op = g.weighted_ops()[-1].name
    with torch.no_grad():
        p = torch.softmax(model(x[:1]).double(), -1)[0].numpy()
    np.testing.assert_allclose(f[logits_op], p * (1 - p), rtol=0.08)


def test_a_channel_nothing_reads_has_zero_sensitivity():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    with torch.no_grad():
        model.b.weight[:, 2] = 0.0  # hidden unit 2 of layer a feeds nothing
    g = capture(model, (6,))
    f = channel_fisher(g, torch.randn(256, 6).split(64), seed=0)
    hidden = f[g.weighted_ops()[0].name]
    assert hidden.shape == (4,) and hidden[2] == 0.0 and np.all(np.delete(hidden, 2) > 0)


def test_same_seed_same_fisher():
    torch.manual_seed(0)
    g = capture(TwoLayer().eval(), (6,))
    x = torch.randn(64, 6)
    a, b = channel_fisher(g, x.split(16), seed=3), channel_fisher(g, x.split(16), seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_batch_is_back_propagated_in_chunks_whose_terms_add_up(monkeypatch):
    """The backward pass holds every layer's activations of the samples it runs, so a calibration batch
    runs in chunks of FISHER_CHUNK samples; their terms add up to what one sample at a time gives."""
    import ptq.calib.sensitivity as sens
    torch.manual_seed(0)
    g = capture(TwoLayer().eval(), (6,))
    x = torch.randn(10, 6)
    seen = []
    execute = sens.execute
    monkeypatch.setattr(sens, "execute", lambda graph, xb, kernels: seen.append(len(xb)) or execute(graph, xb, kernels))
    batched = channel_fisher(g, [x], seed=5)
    assert seen == [4, 4, 2] and sens.FISHER_CHUNK == 4
    single = channel_fisher(g, x.split(1), seed=5)
    for name in batched:
        np.testing.assert_allclose(batched[name], single[name], rtol=1e-6)
