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


def test_the_coherent_fisher_is_the_same_at_any_thread_count():
    from ptq.determinism import threads
    torch.manual_seed(0)
    g = capture(ConvHead().eval(), (3, 8, 8))
    x = torch.randn(24, 3, 8, 8)
    with threads(1):
        a = channel_fisher(g, x.split(12), seed=1, coherent=True)
    with threads(2):
        b = channel_fisher(g, x.split(12), seed=1, coherent=True)
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


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_a_conv_channels_sensitivity_predicts_the_divergence_its_weight_error_causes():
    """One weight error moves all 64 positions of a channel the same way, and the pooled head adds
    them up: ½·F_c·δwᵀHδw must give the KL a small error of the probe's shape causes, where counting
    the positions as independent (`diagonal`, Σ_p E[g²]) undercounts it many times over."""
    import ptq.calib.sensitivity as sens
    torch.manual_seed(0)
    model = ConvHead().eval()
    g = capture(model, (3, 8, 8))
    distinct = torch.randn(64, 3, 8, 8) + 0.5
    x = distinct.repeat(32, 1, 1, 1)  # each input under many sampled labels
    conv = g.weighted_ops()[0]
    f = channel_fisher(g, x.split(512), seed=0, coherent=True)[conv.name]
    independent = channel_fisher(g, x.split(512), seed=0)[conv.name]  # `diagonal`: positions as if independent
    c, eps = 1, 0.05
    dw = torch.zeros_like(model.conv.weight)
    dw[c] = eps * sens.probe_error(model.conv.weight.detach().numpy())[c]
    with torch.no_grad():
        dz = torch.nn.functional.conv2d(distinct, dw, None, padding=1)[:, c]
        p = torch.log_softmax(model(distinct).double(), -1)
        model.conv.weight += dw
        q = torch.log_softmax(model(distinct).double(), -1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    h_term = float((dz.double() ** 2).mean())
    assert 0.8 < 0.5 * f[c] * h_term / kl < 1.25
    assert 0.5 * independent[c] * h_term / kl < 0.5


def test_a_layer_already_on_the_probe_grid_keeps_the_positions_sum():
    """Weights a 4-bit grid holds exactly leave the probe at zero: the coherent F is then the diagonal one."""
    import ptq.calib.sensitivity as sens
    torch.manual_seed(0)
    model = ConvHead().eval()
    with torch.no_grad():
        w = model.conv.weight
        w.copy_(torch.randint(-7, 8, w.shape).float() * 0.25)
        w[:, 0, 0, 0] = 1.75  # every channel's largest magnitude is 7 steps
    g = capture(model, (3, 8, 8))
    conv = g.weighted_ops()[0]
    assert float(sens.probe_error(conv.weight).abs().max()) == 0.0
    x = torch.randn(40, 3, 8, 8)
    f = channel_fisher(g, x.split(8), seed=2, coherent=True)[conv.name]
    assert np.array_equal(f, channel_fisher(g, x.split(8), seed=2)[conv.name])
