"""How much the network's output cares about each output channel of each layer (Fisher sensitivity).

A weight error δw_c of output channel c perturbs that channel's pre-activation output by
δz_p = δw_c·x_p at every position p. To second order, the expected divergence of the model's output
distribution from the FP32 one grows by ½ · E[(Σ_p g_p δz_p)²], where g is the gradient of −log p(y|x)
with y drawn from the model's own softmax (so E[g gᵀ] is the Fisher). The methods write this as
½ · F_c · δw_cᵀ H δw_c, with H = E[x xᵀ] the layer's input moment over samples and positions (already
collected), so F_c must carry what H leaves out: how the positions' terms add up. Taking them as
independent, F_c = Σ_p E[g_p²], leaves out the cross terms; but one weight error moves every position
the same way, and neighbouring positions share both input and gradient, so the terms add coherently.
On EfficientNet-Lite0 that undercounted a conv's true cost 2–21-fold, most in the layers that feed a
residual stream, against 0.8-fold for the classifier (one position): the allocators then take bits
from the convs to give the classifier (BENCHMARKS.md, session 42). `calibration.sensitivity` chooses:
`diagonal` is Σ_p E[g_p²]; `coherent` (ours) measures F_c with a probe, δw⁰ = the weights' own
rounding error on a 4-bit grid (`PROBE_BITS`, per-channel max-abs steps), a weight error shaped like
the ones the methods compare,

    F_c = E_s[(Σ_p g_p δz⁰_p)²] / E_{s,p}[δz⁰_p²],

the channel's exact second-order cost of the probe over its modelled part; F_c·δw_cᵀHδw_c is then
exact for δw⁰ and carries the positions' coherence to the candidates the methods weigh. A channel the
probe leaves at zero (weights already on that grid, or inputs always zero) keeps Σ_p E[g_p²]. Its
numerator is one squared sum per sample, so it needs more samples than the diagonal (measured: 128
where the diagonal takes 32). One backward pass per chunk of FISHER_CHUNK samples measures every
layer at once; the probe's output is computed in the gradient hook from the layer's input.

This turns per-layer output errors into one network-wide currency: methods that spend a bit budget
across layers (multipoint's extra points, the allocator's candidates) rank by F_c · e_c instead of
relative errors, which ignore that an error in a layer feeding a residual stream, or in the logits,
costs far more than the same relative error elsewhere.

**Sentence encoders (ours).** A text encoder's output is token states, not logits: a softmax over
all T·D of them models nothing. Its output is used as the normalised mean of the states over the
kept tokens (`calib.tokens`, `ptq.metrics.sentence_embeddings`), so there the model's output is
taken to be that embedding u with unit Gaussian noise, N(u, I), whose Fisher is JᵀJ: drawing
ε ~ N(0, I) and back-propagating ε·u gives g = Jᵀε. Padded tokens then get no gradient, as they
feed no embedding, and the probe's E_{s,p} is taken over the kept tokens, as H is.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..determinism import fixed_order
from ..ir import Graph, Op, execute
from ..ir.floatops import apply_act, conv_float, float_kernels, linear_float
from .tokens import kept_tokens

# Samples per backward pass: a batch's Fisher terms are summed over chunks of this many, because a
# backward pass holds every layer's saved activations at once (about 120 MB a sample on resnet50).
FISHER_CHUNK = 4
PROBE_BITS = 4  # the probe weight error's grid: the widths the budgeted methods decide between


SENSITIVITIES = ("diagonal", "coherent")  # calibration.sensitivity: how F_c counts a channel's positions


def channel_fisher(graph: Graph, batches, seed: int = 0, coherent: bool = False) -> dict[str, np.ndarray]:
    """{weighted op: F (C_out,)} from the samples of `batches` (module docstring)."""
    return fisher_mean(fisher_terms(graph, batches, seed, coherent=coherent))


def probe_error(weight: np.ndarray) -> torch.Tensor:
    """δw⁰: the weights' rounding error on a PROBE_BITS grid with per-channel max-abs steps (float32)."""
    w = torch.from_numpy(np.asarray(weight, np.float64))
    top = w.reshape(w.shape[0], -1).abs().amax(1).reshape(-1, *([1] * (w.dim() - 1)))
    step = torch.where(top > 0, top / (2 ** (PROBE_BITS - 1) - 1), torch.ones_like(top))
    return (torch.round(w / step) * step - w).float()


def fisher_terms(graph: Graph, batches, seed: int = 0, skip: int = 0, skip_size: int = 0,
                 coherent: bool = False) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Per batch: (its samples, {weighted op: (4, C) sums over its samples}), the rows Σ_p g², the
    probe's (Σ_p g·δz⁰)², Σ_p δz⁰² and (every column) the positions counted (the last three zero
    unless `coherent`); `fisher_mean` turns their totals into F. The labels are drawn from one
    generator in batch order; a calibration rank whose batches follow `skip` batches of `skip_size`
    samples first advances it past their draws, so each batch's terms are the bits one process
    computes for it."""
    kernels = float_kernels(torch.float32)
    order: list[str] = []  # the layers in forward order
    terms: dict[str, np.ndarray] = {}
    kept: list[torch.Tensor | None] = [None]  # the chunk's kept tokens (sentence encoders)
    params = {op.name: (torch.from_numpy(op.weight).float(),
                        None if op.bias is None else torch.from_numpy(op.bias).float()) for op in graph.weighted_ops()}
    probes = {op.name: probe_error(op.weight) if coherent else None for op in graph.weighted_ops()}

    def weighted(op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        w, b = params[op.name]
        z = (conv_float if op.kind == "conv" else linear_float)(op, xs[0], w, b)
        if not z.requires_grad:  # nothing upstream carries a gradient (a layer fed by an embedding lookup of token ids)
            z.requires_grad_(True)
        probe = probes[op.name]  # the input is held for the probe only: the backward pass of a conv keeps no input
        z.register_hook(_channel_sums(op, None if probe is None else xs[0].detach(), probe, kept, terms))
        order.append(op.name)
        return apply_act(op, z)

    kernels = {**kernels, "conv": weighted, "linear": weighted}
    tokens = kept_tokens(graph)
    gen = torch.Generator().manual_seed(seed)
    for xb in batches:
        total: dict[str, np.ndarray] = {}
        for part in xb.split(FISHER_CHUNK):
            order.clear()
            terms.clear()
            with torch.enable_grad(), fixed_order():  # conv backward's sums otherwise follow the thread count
                kept[0] = tokens(part) if tokens is not None else None
                out = execute(graph, part.float().requires_grad_(True), kernels)[graph.outputs[0]]
                keep = kept[0]
                if keep is not None and out.dim() == 3 and out.shape[1] == keep.shape[1]:
                    _embedding_loss(out, keep, gen, skip, skip_size).backward()
                else:
                    _class_loss(out.reshape(out.shape[0], -1), gen, skip, skip_size).backward()
                skip = 0
            for name in order:
                total[name] = terms[name] if name not in total else total[name] + terms[name]
        yield xb.shape[0], {name: total[name] for name in order}


def _channel_sums(op: Op, x: torch.Tensor | None, probe: torch.Tensor | None, kept: list, terms: dict[str, np.ndarray]):
    """A gradient hook that stores the layer's (4, C) Fisher sums (`fisher_terms`) as soon as its
    gradient is complete: no layer's gradient is held until the end of the backward pass. The
    probe's output change (when there is a probe) is computed here, from the layer's input `x`."""
    def hook(g: torch.Tensor) -> None:
        g2 = g.double()
        g2 = g2.mul_(g2).sum(dim=tuple(d for d in range(g2.dim()) if d != (1 if op.kind == "conv" else g2.dim() - 1)))
        rest = torch.zeros(3, len(g2), dtype=g2.dtype)
        if probe is not None:
            with torch.no_grad():
                dz = (conv_float if op.kind == "conv" else linear_float)(op, x, probe, None)
                gc, dz = by_channel(op, g.double()), by_channel(op, dz.double())  # (N, C, positions)
                keep = kept[0]
                if keep is not None and dz.shape[0] == keep.shape[0] and dz.shape[2] == keep.shape[1]:
                    dz = dz * keep[:, None, :]
                    rest[2] = float(keep.sum())
                else:
                    rest[2] = float(dz.shape[0] * dz.shape[2])
                coherent = (gc * dz).sum(2)
                rest[0], rest[1] = (coherent * coherent).sum(0), (dz * dz).sum((0, 2))
        terms[op.name] = torch.cat([g2[None], rest]).numpy()
    return hook


def by_channel(op: Op, t: torch.Tensor) -> torch.Tensor:
    """A layer output as (N, C, positions): a conv's (N, C, H, W), a linear's (N, ..., C)."""
    if op.kind == "conv":
        return t.flatten(2)
    return t.reshape(t.shape[0], -1, t.shape[-1]).transpose(1, 2)


def _class_loss(logits: torch.Tensor, gen: torch.Generator, skip: int, skip_size: int) -> torch.Tensor:
    """−log p(y|x) summed over the batch, y drawn from the model's own softmax (after advancing the
    generator past `skip` batches of `skip_size` samples: the same call on their shape draws what
    they drew)."""
    for _ in range(skip):
        torch.multinomial(torch.ones(skip_size, logits.shape[1]), 1, generator=gen)
    y = torch.multinomial(torch.softmax(logits.detach().double(), -1).float(), 1, generator=gen)[:, 0]
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


def _embedding_loss(hidden: torch.Tensor, keep: torch.Tensor, gen: torch.Generator, skip: int,
                    skip_size: int) -> torch.Tensor:
    """Σ ε·u over the batch: u the normalised mean of the states (N, T, D) over the kept tokens, ε
    unit Gaussian noise drawn per sample (after the draws of `skip` earlier batches)."""
    d = hidden.shape[-1]
    for _ in range(skip):
        torch.randn(skip_size, d, generator=gen, dtype=torch.float64)
    m = keep.to(hidden.dtype)[..., None]
    e = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    u = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    eps = torch.randn(len(hidden), d, generator=gen, dtype=torch.float64).to(hidden.dtype)
    return (eps * u).sum()


def fisher_mean(terms: Iterable[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """F per channel from per-batch `fisher_terms`, added in the order given (batch order):
    E_s[(Σ_p g·δz⁰)²] / E_{s,p}[δz⁰²], or Σ_p E[g²] where the probe moved nothing."""
    sums: dict[str, np.ndarray] = {}
    count = 0
    for n, batch in terms:
        for name, f in batch.items():
            sums[name] = f if name not in sums else sums[name] + f
        count += n
    count = max(count, 1)
    out = {}
    for name, (g2, coherent, dz2, positions) in sums.items():
        moved = dz2 > 0
        out[name] = np.where(moved, coherent * positions / np.where(moved, dz2 * count, 1.0), g2 / count)
    return out


__all__ = ["SENSITIVITIES", "by_channel", "channel_fisher", "fisher_mean", "fisher_terms", "probe_error"]
