"""Padding is not data: which positions of a text encoder's activations calibration observes.

An encoder whose input carries an attention mask (a masked softmax's second input, README
"Transformers") computes hidden states at the padded positions too. Nothing at a kept token reads
them, yet they are most of a batch of short sentences (65 % of the bundled calibration sentences'
tokens at 32 positions), and statistics taken over them set the activation ranges and the layer
input moments H of positions that never matter. `kept_tokens` gives, per batch, the (N, T) mask of
kept tokens; `at_kept` takes a tensor's values there: the rows of an (N, T, C) hidden state, the
kept query rows of a per-head (N, H, T, X) tensor, and of attention scores also the kept keys (the
softmax drops the others). Padded positions then change no statistic.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..ir import Graph, execute
from ..ir.floatops import float_kernels


def _mask_graph(graph: Graph) -> Graph | None:
    """The ops that compute the first masked softmax's mask from the input (None: no masked softmax)."""
    mask = next((op.inputs[1] for op in graph.ops if op.kind == "softmax" and len(op.inputs) == 2), None)
    if mask is None:
        return None
    producers = graph.producers()
    need, todo = set(), [mask]
    while todo:
        t = todo.pop()
        if t in producers and t not in need:
            need.add(t)
            todo.extend(producers[t].inputs)
    return Graph(graph.input, graph.input_shape, [op for op in graph.ops if op.output in need], [mask])


def kept_tokens(graph: Graph) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a graph with a masked softmax: input batch → (N, T) bool mask of the kept tokens (the
    attention mask's nonzero keys). None for other graphs, whose statistics see every position."""
    sub = _mask_graph(graph)
    if sub is None:
        return None
    kernels = float_kernels(torch.float32)

    def keep(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            m = execute(sub, x, kernels)[sub.outputs[0]]
        return m.reshape(len(x), -1) != 0

    return keep


def at_kept(y: torch.Tensor, keep: torch.Tensor | None, keys: bool = False) -> torch.Tensor:
    """y's values at kept tokens: an (N, T, C) tensor's kept rows (kept, C); a per-head (N, H, T, X)
    tensor's values at kept queries, flattened, and with `keys` (attention scores, X = T) only those
    at kept keys too; any other tensor unchanged."""
    if keep is None or y.dim() not in (3, 4) or y.shape[0] != keep.shape[0] or y.shape[y.dim() - 2] != keep.shape[1]:
        return y
    if y.dim() == 3:
        return y[keep]
    mask = keep[:, None, :, None] & keep[:, None, None, :] if keys else keep[:, None, :, None]
    return y[mask.expand_as(y)]
