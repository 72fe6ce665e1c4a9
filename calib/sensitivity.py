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

import numpy as np
import torch

from ..ir import Graph, Op, execute
from ..ir.floatops import apply_act, conv_float, float_kernels, linear_float


def _preact_grads(graph: Graph, batches, seed: int, draws: int = 1):
    """Per batch, {weighted op: (E over `draws` labels of g², its pre-activation's shape)}: g the
    gradient of −log p(y|x) at each layer's pre-activation, y drawn from the model's own softmax."""
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
        g2: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            logits = execute(graph, xb.float().requires_grad_(True), kernels)[graph.outputs[0]]
            logits = logits.reshape(logits.shape[0], -1)
            p = torch.softmax(logits.detach().double(), -1).float()
            for d in range(draws):
                y = torch.multinomial(p, 1, generator=gen)[:, 0]
                torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward(retain_graph=d < draws - 1)
                for name, z in pre.items():
                    g = z.grad.double() ** 2
                    g2[name] = g if d == 0 else g2[name] + g
                    z.grad = None
        yield {name: g / draws for name, g in g2.items()}


def channel_fisher(graph: Graph, batches, seed: int = 0) -> dict[str, np.ndarray]:
    """{weighted op: F (C_out,)} summed over positions and averaged over the samples of `batches`."""
    sums: dict[str, np.ndarray] = {}
    count = 0
    for grads in _preact_grads(graph, batches, seed):
        for name, g2 in grads.items():
            ch = 1 if g2.dim() == 4 else g2.dim() - 1  # conv channels on dim 1, linear features last
            f = g2.sum(dim=tuple(d for d in range(g2.dim()) if d != ch)).numpy()
            sums[name] = f if name not in sums else sums[name] + f
        count += next(iter(grads.values())).shape[0] if grads else 0
    return {k: v / max(count, 1) for k, v in sums.items()}


def element_fisher(graph: Graph, batches, names: set[str], seed: int = 0, draws: int = 4) -> dict[str, torch.Tensor]:
    """{op of `names`: E[g²] per sample and element of its pre-activation (N, ...), float32}, each
    averaged over `draws` labels drawn from the model's softmax: the per-element Fisher weight BRECQ
    puts on a block's output error."""
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for grads in _preact_grads(graph, batches, seed, draws):
        for n in names:
            parts[n].append(grads[n].float())
    return {n: torch.cat(p) for n, p in parts.items()}


__all__ = ["channel_fisher", "element_fisher"]
