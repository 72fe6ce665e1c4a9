"""The graph IR: an explicit, topologically ordered list of ops, and one scheduler that runs it.

Every back end (float, fake-quant reference, integer simulator) supplies a registry that maps an op
kind to a kernel; the scheduler frees each tensor after its last consumer so memory stays bounded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

# Ops whose output is a new tensor with its own encoding (they requantize).
REQUANT_KINDS = ("conv", "linear", "add", "avgpool", "concat", "lut")
# Ops whose output reuses their (first) input's encoding: integer values pass through unchanged.
PASSTHROUGH_KINDS = ("maxpool", "clamp", "reshape", "pad")
WEIGHTED_KINDS = ("conv", "linear")
LUT_FUNCTIONS = ("hardswish", "sigmoid", "silu", "gelu", "tanh", "hardsigmoid")


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


# ---- float semantics of each op (shared by the FP32 executor and the fake-quant reference) ----

def conv_float(op: Op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    a = op.attrs
    return F.conv2d(x, weight, bias, a["stride"], a["padding"], a["dilation"], a["groups"])


def linear_float(op: Op, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def apply_act(op: Op, y: torch.Tensor) -> torch.Tensor:
    act = op.attrs.get("act")
    if act is None:
        return y
    lo, hi = act
    return torch.clamp(y, min=lo, max=hi)


def maxpool(op: Op, x: torch.Tensor, pad_value: float) -> torch.Tensor:
    a = op.attrs
    p = a["padding"]
    if any(p):
        x = F.pad(x, (p[1], p[1], p[0], p[0]), value=pad_value)
    return F.max_pool2d(x, a["kernel"], a["stride"], 0, a["dilation"], a["ceil_mode"])


def pool_sum(op: Op, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Window sums of an average pool and the window size (count_include_pad semantics)."""
    a = op.attrs
    if a.get("global"):
        s = x.sum(dim=(2, 3), keepdim=True)
        return s, x.shape[2] * x.shape[3]
    k = a["kernel"]
    count = k[0] * k[1]
    s = F.avg_pool2d(x, k, a["stride"], a["padding"], ceil_mode=False, count_include_pad=True) * count
    return s, count


def reshape(op: Op, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], *op.attrs["shape"])


def pad(op: Op, x: torch.Tensor, value: float) -> torch.Tensor:
    return F.pad(x, op.attrs["pads"], value=value)


def lut_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"hardswish": F.hardswish, "sigmoid": torch.sigmoid, "silu": F.silu, "gelu": F.gelu,
            "tanh": torch.tanh, "hardsigmoid": F.hardsigmoid}[name]


def float_kernels(dtype: torch.dtype = torch.float32) -> dict[str, Kernel]:
    """Kernels that run the IR in floating point: the FP32 model with BatchNorm folded."""
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def params(op: Op):
        if op.name not in cache:
            w = torch.from_numpy(op.weight).to(dtype)
            b = torch.from_numpy(op.bias).to(dtype) if op.bias is not None else None
            cache[op.name] = (w, b)
        return cache[op.name]

    def conv(op, xs):
        w, b = params(op)
        return apply_act(op, conv_float(op, xs[0], w, b))

    def linear(op, xs):
        w, b = params(op)
        return apply_act(op, linear_float(op, xs[0], w, b))

    def add(op, xs):
        return apply_act(op, xs[0] + xs[1])

    def avgpool(op, xs):
        s, count = pool_sum(op, xs[0])
        return apply_act(op, s / count)

    return {
        "conv": conv, "linear": linear, "add": add, "avgpool": avgpool,
        "clamp": lambda op, xs: apply_act(op, xs[0]),
        "maxpool": lambda op, xs: maxpool(op, xs[0], -math.inf),
        "reshape": lambda op, xs: reshape(op, xs[0]),
        "pad": lambda op, xs: pad(op, xs[0], op.attrs["value"]),
        "concat": lambda op, xs: torch.cat(xs, dim=op.attrs["dim"]),
        "lut": lambda op, xs: lut_function(op.attrs["function"])(xs[0]),
    }


def run_float(graph: Graph, x: torch.Tensor, dtype: torch.dtype = torch.float32,
              kernels: dict[str, Kernel] | None = None) -> torch.Tensor:
    """FP32 output of the captured graph (first output)."""
    kernels = kernels or float_kernels(dtype)
    with torch.no_grad():
        return execute(graph, x.to(dtype), kernels)[graph.outputs[0]]
