"""How much the network's output cares about each output channel of each layer (Fisher diagonal).

A weight error δw_c of output channel c perturbs that channel's pre-activation output by δw_c·x at
every position. To second order, the expected divergence of the model's output distribution from
the FP32 one grows by ½ · F_c · δw_cᵀ H δw_c, where H = E[x xᵀ] is the layer's input moment (already
collected) and F_c = Σ_positions E[g²] is the Fisher information of the channel's pre-activation:
g is the gradient of −log p(y|x) with y drawn from the model's own softmax, so E[g gᵀ] is the Fisher
and its diagonal is measured with one backward pass per batch for every layer at once.

This turns per-layer output errors into one network-wide currency: methods that spend a bit budget
across layers (multipoint's extra points, the allocator's candidates) rank by F_c · e_c instead of
relative errors, which ignore that an error in a layer feeding a residual stream, or in the logits,
costs far more than the same relative error elsewhere.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ..ir import Graph, Op, execute
from ..ir.floatops import apply_act, conv_float, float_kernels, linear_float


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
    pre: dict[str, torch.Tensor] = {}
    params = {op.name: (torch.from_numpy(op.weight).float(),
                        None if op.bias is None else torch.from_numpy(op.bias).float()) for op in graph.weighted_ops()}

    def weighted(op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        w, b = params[op.name]
        z = (conv_float if op.kind == "conv" else linear_float)(op, xs[0], w, b)
        z.retain_grad()
        pre[op.name] = z
        return apply_act(op, z)

    kernels = {**kernels, "conv": weighted, "linear": weighted}
    gen = torch.Generator().manual_seed(seed)
    for xb in batches:
        pre.clear()
        with torch.enable_grad():
            logits = execute(graph, xb.float().requires_grad_(True), kernels)[graph.outputs[0]]
            logits = logits.reshape(logits.shape[0], -1)
            for _ in range(skip):  # the same call on the skipped batches' shape draws what they drew
                torch.multinomial(torch.ones(skip_size, logits.shape[1]), 1, generator=gen)
            skip = 0
            y = torch.multinomial(torch.softmax(logits.detach().double(), -1).float(), 1, generator=gen)[:, 0]
            torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
        terms = {}
        for name, z in pre.items():
            g2 = z.grad.double() ** 2
            ch = 1 if z.dim() == 4 else z.dim() - 1  # conv channels on dim 1, linear features last
            terms[name] = g2.sum(dim=tuple(d for d in range(g2.dim()) if d != ch)).numpy()
        yield xb.shape[0], terms


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
