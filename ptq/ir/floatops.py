"""The float semantics of every op kind: the FP32 executor, and the helpers the fake-quant reference
and the integer simulator share with it (padding, pooling windows, reshapes, lookup functions)."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .graph import Graph, Kernel, Op, execute
from .ops import require_all


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


def permute(op: Op, x: torch.Tensor) -> torch.Tensor:
    return x.permute(*op.attrs["perm"])


def slice_(op: Op, x: torch.Tensor) -> torch.Tensor:
    a = op.attrs
    return x[(slice(None),) * a["dim"] + (slice(a["start"], a["end"], a["step"]),)]


def masked_scores(xs: list[torch.Tensor]) -> torch.Tensor:
    """A softmax's scores with the keys its optional keep mask (second input) drops set to −inf."""
    return xs[0] if len(xs) == 1 else xs[0].masked_fill(xs[1] == 0, -math.inf)


def pad(op: Op, x: torch.Tensor, value: float) -> torch.Tensor:
    return F.pad(x, op.attrs["pads"], value=value)


def lut_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return {"hardswish": F.hardswish, "sigmoid": torch.sigmoid, "silu": F.silu, "gelu": F.gelu,
            "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
            "tanh": torch.tanh, "hardsigmoid": F.hardsigmoid}[name]


def float_kernels(dtype: torch.dtype = torch.float32,
                  on_pre_act: Callable[[Op, torch.Tensor], None] | None = None) -> dict[str, Kernel]:
    """Kernels that run the IR in floating point: the FP32 model with BatchNorm folded. `on_pre_act`,
    when given, sees each conv's and linear's output before its fused activation."""
    cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def params(op: Op):
        if op.name not in cache:
            w = torch.from_numpy(op.weight).to(dtype)
            b = torch.from_numpy(op.bias).to(dtype) if op.bias is not None else None
            cache[op.name] = (w, b)
        return cache[op.name]

    def weighted(f):
        def kernel(op, xs):
            w, b = params(op)
            pre = f(op, xs[0], w, b)
            if on_pre_act is not None:
                on_pre_act(op, pre)
            return apply_act(op, pre)
        return kernel

    conv, linear = weighted(conv_float), weighted(linear_float)

    def add(op, xs):
        return apply_act(op, xs[0] + xs[1])

    def avgpool(op, xs):
        s, count = pool_sum(op, xs[0])
        return apply_act(op, s / count)

    def layernorm(op, xs):
        g, b = (torch.from_numpy(op.params[k]).to(dtype) for k in ("gamma", "beta"))
        return apply_act(op, F.layer_norm(xs[0], (xs[0].shape[-1],), g, b, op.attrs["eps"]))

    return require_all("float", {
        "conv": conv, "linear": linear, "add": add, "avgpool": avgpool,
        "clamp": lambda op, xs: apply_act(op, xs[0]),
        "maxpool": lambda op, xs: maxpool(op, xs[0], -math.inf),
        "reshape": lambda op, xs: reshape(op, xs[0]),
        "pad": lambda op, xs: pad(op, xs[0], op.attrs["value"]),
        "concat": lambda op, xs: torch.cat(xs, dim=op.attrs["dim"]),
        "lut": lambda op, xs: lut_function(op.attrs["function"])(xs[0]),
        "matmul": lambda op, xs: apply_act(op, torch.matmul(xs[0], xs[1]) * op.attrs["alpha"]),
        "scale": lambda op, xs: apply_act(op, xs[0] * op.attrs["factor"]),
        "layernorm": layernorm,
        "softmax": lambda op, xs: torch.softmax(masked_scores(xs), dim=-1),
        "embedding": lambda op, xs: F.embedding(xs[0].long(), torch.from_numpy(op.params["table"]).to(dtype))
        + torch.from_numpy(op.params["offset"]).to(dtype),
        "offset": lambda op, xs: apply_act(op, pad(op, xs[0], 0.0) + torch.from_numpy(op.params["offset"]).to(dtype)),
        "permute": lambda op, xs: permute(op, xs[0]),
        "slice": lambda op, xs: slice_(op, xs[0]),
    })


def run_float(graph: Graph, x: torch.Tensor, dtype: torch.dtype = torch.float32,
              kernels: dict[str, Kernel] | None = None) -> torch.Tensor:
    """FP32 output of the captured graph (first output)."""
    kernels = kernels or float_kernels(dtype)
    with torch.no_grad():
        return execute(graph, x.to(dtype), kernels)[graph.outputs[0]]
