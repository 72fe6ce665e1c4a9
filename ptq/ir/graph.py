"""The graph IR: an explicit, topologically ordered list of ops, and one scheduler that runs it.

Every back end (float, fake-quant reference, integer simulator) supplies a registry that maps an op
kind to a kernel; the scheduler frees each tensor after its last consumer so memory stays bounded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .ops import PASSTHROUGH_KINDS, WEIGHTED_KINDS


@dataclass
class Op:
    """One IR op. `name` is the module path (stable across runs); `output` names its tensor."""

    name: str
    kind: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = None  # float32, BatchNorm folded
    bias: np.ndarray | None = None
    record: dict[str, Any] | None = None  # the manifest record, when the op comes from a manifest
    params: dict[str, np.ndarray] = field(default_factory=dict)  # float parameters kept in float (LayerNorm's gamma, beta)

    @property
    def weight_matrix_shape(self) -> tuple[int, int]:
        """(output channels, reduction length K) of a conv/linear weight."""
        assert self.weight is not None
        return self.weight.shape[0], int(np.prod(self.weight.shape[1:]))


@dataclass
class Graph:
    """A captured model: one input tensor, ops in topological order, one or more outputs."""

    input: str
    input_shape: tuple[int, ...]  # per sample, without the batch dimension
    ops: list[Op]
    outputs: list[str]

    def producers(self) -> dict[str, Op]:
        return {op.output: op for op in self.ops}

    def weighted_ops(self) -> list[Op]:
        return [op for op in self.ops if op.kind in WEIGHTED_KINDS]

    def encoding_source(self) -> dict[str, str]:
        """Map each tensor to the tensor whose encoding it shares (itself unless pass-through)."""
        src: dict[str, str] = {self.input: self.input}
        for op in self.ops:
            src[op.output] = src[op.inputs[0]] if op.kind in PASSTHROUGH_KINDS else op.output
        return src


def is_depthwise(op: Op) -> bool:
    """A grouped conv with one input channel per group (each output channel sees one input channel)."""
    return op.kind == "conv" and op.attrs["groups"] > 1 and op.weight is not None and op.weight.shape[1] == 1


Kernel = Callable[[Op, list[torch.Tensor]], torch.Tensor]


def execute(graph: Graph, x: torch.Tensor, kernels: dict[str, Kernel],
            on_output: Callable[[Op, list[torch.Tensor], torch.Tensor], None] | None = None,
            keep: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Run the ops in order with the given kernels; return the graph outputs (and `keep` tensors)."""
    keep = set(keep) | set(graph.outputs)
    last_use: dict[str, int] = {}
    for i, op in enumerate(graph.ops):
        for t in op.inputs:
            last_use[t] = i
    env: dict[str, torch.Tensor] = {graph.input: x}
    kept: dict[str, torch.Tensor] = {}
    if graph.input in keep:
        kept[graph.input] = x
    for i, op in enumerate(graph.ops):
        args = [env[t] for t in op.inputs]
        kernel = kernels.get(op.kind)
        if kernel is None:
            raise KeyError(f"no kernel for op kind {op.kind!r}")
        y = kernel(op, args)
        if on_output is not None:
            on_output(op, args, y)
        env[op.output] = y
        if op.output in keep:
            kept[op.output] = y
        for t in set(op.inputs):
            if last_use.get(t) == i and t not in keep:
                env.pop(t, None)
    return kept
