"""How much the network's output cares about each output channel of each layer (Fisher diagonal).

A weight error δw_c of output channel c perturbs that channel's pre-activation output by δw_c·x at
every position. To second order, the expected divergence of the model's output distribution from
the FP32 one grows by ½ · F_c · δw_cᵀ H δw_c, where H = E[x xᵀ] is the layer's input moment (already
collected) and F_c = Σ_positions E[g²] is the Fisher information of the channel's pre-activation:
g is the gradient of −log p(y|x) with y drawn from the model's own softmax, so E[g gᵀ] is the Fisher
and its diagonal is measured with one backward pass per chunk of FISHER_CHUNK samples for every layer at once.

This turns per-layer output errors into one network-wide currency: methods that spend a bit budget
across layers (multipoint's extra points, the allocator's candidates) rank by F_c · e_c instead of
relative errors, which ignore that an error in a layer feeding a residual stream, or in the logits,
costs far more than the same relative error elsewhere.

**Sentence encoders (ours).** A text encoder's output is token states, not logits: a softmax over
all T·D of them models nothing. Its output is used as the normalised mean of the states over the
kept tokens (`calib.tokens`, `ptq.metrics.sentence_embeddings`), so there the model's output is
taken to be that embedding u with unit Gaussian noise, N(u, I), whose Fisher is JᵀJ: drawing
ε ~ N(0, I) and back-propagating ε·u gives g = Jᵀε with E[g²] its diagonal. Padded tokens then get
no gradient, as they feed no embedding.
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


def channel_fisher(graph: Graph, batches, seed: int = 0) -> dict[str, np.ndarray]:
    """{weighted op: F (C_out,)} summed over positions and averaged over the samples of `batches`."""
    return fisher_mean(fisher_terms(graph, batches, seed))


def fisher_terms(graph: Graph, batches, seed: int = 0, skip: int = 0,
                 skip_size: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Per batch: (its samples, {weighted op: Σ over its samples of F}). The labels are drawn from
    one generator in batch order; a calibration rank whose batches follow `skip` batches of
    `skip_size` samples first advances it past their draws, so each batch's terms are the bits one
    process computes for it."""
    kernels = float_kernels(torch.float32)
    order: list[str] = []  # the layers in forward order
    terms: dict[str, np.ndarray] = {}
    params = {op.name: (torch.from_numpy(op.weight).float(),
                        None if op.bias is None else torch.from_numpy(op.bias).float()) for op in graph.weighted_ops()}

    def weighted(op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        w, b = params[op.name]
        z = (conv_float if op.kind == "conv" else linear_float)(op, xs[0], w, b)
        if not z.requires_grad:  # nothing upstream carries a gradient (a layer fed by an embedding lookup of token ids)
            z.requires_grad_(True)
        z.register_hook(_squared_sums(op.name, 1 if z.dim() == 4 else z.dim() - 1, terms))
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
                out = execute(graph, part.float().requires_grad_(True), kernels)[graph.outputs[0]]
                keep = tokens(part) if tokens is not None else None
                if keep is not None and out.dim() == 3 and out.shape[1] == keep.shape[1]:
                    _embedding_loss(out, keep, gen, skip, skip_size).backward()
                else:
                    _class_loss(out.reshape(out.shape[0], -1), gen, skip, skip_size).backward()
                skip = 0
            for name in order:
                total[name] = terms[name] if name not in total else total[name] + terms[name]
        yield xb.shape[0], {name: total[name] for name in order}


def _squared_sums(name: str, ch: int, terms: dict[str, np.ndarray]):
    """A gradient hook that stores Σ g² per channel (dim `ch`: 1 for a conv, the last for a linear)
    as soon as the layer's gradient is complete: no layer's gradient is held until the end of the
    backward pass, and the sums are the bits `retain_grad` gave."""
    def hook(g: torch.Tensor) -> None:
        g2 = g.double()
        terms[name] = g2.mul_(g2).sum(dim=tuple(d for d in range(g2.dim()) if d != ch)).numpy()
    return hook


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
    """The per-sample mean of per-batch Fisher terms, added in the order given (batch order)."""
    sums: dict[str, np.ndarray] = {}
    count = 0
    for n, batch in terms:
        for name, f in batch.items():
            sums[name] = f if name not in sums else sums[name] + f
        count += n
    return {k: v / max(count, 1) for k, v in sums.items()}


__all__ = ["channel_fisher", "fisher_mean", "fisher_terms"]
