"""Fake-quant reference: the manifest executed in floating point, quantizing each op's output.

It shares the rounding rule with the integer simulator but none of its arithmetic: weights and
int32 biases are dequantized and multipliers are exact real ratios (quantizing the bias is part of
the quantized model: at 4-bit weights its step s_x·s_w can exceed a 16-bit output step). Agreement between
the two (level-2 verification) shows the integer program realises the intended quantized model.
Tensors flow as integer codes (q) stored in a float dtype.

With `exact_sums` (the checkers' float64 reference) a single-term conv or linear sums its integer
codes in a float32 conv, exact whenever every partial sum stays below 2^24 (Σ|q| · the largest
input code, checked per layer), and applies s_x·s_w once in float64: the quantized model's sums
without rounding, at float32 speed (a float64 depthwise conv is 6× a float32 one on a CPU). Other
layers, and bias correction's float32 kernels, convolve the dequantized values.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..ir import Kernel, Op, execute, require_all
from ..ir.floatops import (conv_float, linear_float, lut_function, masked_scores, maxpool, pad, permute, pool_sum,
                           reshape, slice_)
from ..intmath import F32_EXACT
from ..manifest import Manifest


class Codec:
    """Encoding arithmetic of one manifest: quantize, dequantize, clamp."""

    def __init__(self, m: Manifest):
        self.enc = m.graph["encodings"]

    def params(self, t: str) -> tuple[float, int, int]:
        e = self.enc[t]
        return e["scale"], e["zero_point"], (1 << e["bits"]) - 1

    def quantize(self, y: torch.Tensor, t: str, clamp: list[int] | None = None) -> torch.Tensor:
        s, z, qmax = self.params(t)
        lo, hi = clamp if clamp is not None else (0, qmax)
        return torch.div(y, s).add_(0.5).floor_().add_(z).clamp_(lo, hi)  # in place on the new tensor

    def dequantize(self, q: torch.Tensor, t: str) -> torch.Tensor:
        s, z, _ = self.params(t)
        return torch.sub(q, z).mul_(s)


def dequantized_weight(m: Manifest, rec: dict, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    w = None
    for t in rec["weight"]["terms"]:
        q = torch.from_numpy(m.tensor(t["q"]).astype(np.float64))
        s = torch.from_numpy(m.tensor(t["scale"])).reshape(-1, *([1] * (q.dim() - 1)))
        w = q * s if w is None else w + q * s
    return w.to(dtype)


def dequantized_bias(m: Manifest, rec: dict) -> np.ndarray:
    """The int32 bias at its real scale s_x·scale_0: the bias the integer program adds."""
    s_x = m.encoding(rec["inputs"][0])["scale"]
    s0 = m.tensor(rec["weight"]["terms"][0]["scale"])
    return m.tensor(rec["bias"]["q"]).astype(np.float64) * s_x * s0


def _integer_weight(m: Manifest, rec: dict, codec: Codec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A single-term layer's integer weights (float32) and s_x·s_w per output channel (float64), when
    a float32 sum of its integer products is exact for every input: Σ|q| · max|q_x − z_x| < 2^24."""
    terms = rec["weight"]["terms"]
    if len(terms) != 1:
        return None
    q = m.tensor(terms[0]["q"])
    s_x, z, top = codec.params(rec["inputs"][0])
    if float(np.abs(q.reshape(q.shape[0], -1).astype(np.int64)).sum(1).max(initial=0)) * max(z, top - z) >= F32_EXACT:
        return None
    return torch.from_numpy(q.astype(np.float32)), torch.from_numpy(m.tensor(terms[0]["scale"]).astype(np.float64) * s_x)


def reference_kernels(m: Manifest, dtype: torch.dtype = torch.float64, exact_sums: bool = True) -> dict[str, Kernel]:
    codec = Codec(m)
    weights: dict[str, tuple] = {}

    def weighted(op: Op, xs):
        rec = op.record
        if op.name not in weights:
            exact = _integer_weight(m, rec, codec) if exact_sums else None
            weights[op.name] = exact if exact is not None else (dequantized_weight(m, rec, dtype), None)
        w, scale = weights[op.name]
        b = torch.from_numpy(dequantized_bias(m, rec)).to(dtype)
        f = conv_float if op.kind == "conv" else linear_float
        if scale is None:
            y = f(op, codec.dequantize(xs[0], op.inputs[0]), w, b)
        else:  # the integer sums, exact in float32, then the real scales
            view = (-1, 1, 1) if op.kind == "conv" else (-1,)
            acc = f(op, torch.sub(xs[0], codec.params(op.inputs[0])[1]).float(), w, None).to(dtype)
            y = acc.mul_(scale.to(dtype).reshape(view)).add_(b.reshape(view))
        return codec.quantize(y, op.output, rec["clamp"])

    def add(op, xs):
        y = codec.dequantize(xs[0], op.inputs[0]) + codec.dequantize(xs[1], op.inputs[1])
        return codec.quantize(y, op.output, op.record["clamp"])

    def concat(op, xs):
        y = torch.cat([codec.dequantize(x, t) for x, t in zip(xs, op.inputs)], dim=op.attrs["dim"])
        return codec.quantize(y, op.output, op.record["clamp"])

    def avgpool(op, xs):
        s, count = pool_sum(op, codec.dequantize(xs[0], op.inputs[0]))
        return codec.quantize(s / count, op.output, op.record["clamp"])

    def lut(op, xs):
        y = lut_function(op.attrs["function"])(codec.dequantize(xs[0], op.inputs[0]))
        return codec.quantize(y, op.output)

    def matmul(op, xs):
        y = torch.matmul(codec.dequantize(xs[0], op.inputs[0]), codec.dequantize(xs[1], op.inputs[1]))
        return codec.quantize(y * op.attrs["alpha"], op.output, op.record["clamp"])

    def scale(op, xs):
        return codec.quantize(codec.dequantize(xs[0], op.inputs[0]) * op.attrs["factor"], op.output, op.record["clamp"])

    def layernorm(op, xs):
        r = op.record["norm"]
        g, b = (torch.from_numpy(m.tensor(r[k])).to(dtype) for k in ("gamma", "beta"))
        x = codec.dequantize(xs[0], op.inputs[0])
        return codec.quantize(F.layer_norm(x, (x.shape[-1],), g, b, op.attrs["eps"]), op.output, op.record["clamp"])

    def softmax(op, xs):
        real = [codec.dequantize(x, t) for x, t in zip(xs, op.inputs)]
        return codec.quantize(torch.softmax(masked_scores(real), dim=-1), op.output)

    def embedding(op, xs):
        """The quantized table's rows (its parameters, as the weights' integers are) at the output scale."""
        r = op.record["embedding"]
        s = codec.params(op.output)[0]
        table, offset = (torch.from_numpy(m.tensor(r[k]).astype(np.float64)).to(dtype) * s for k in ("table", "offset"))
        return codec.quantize(table[xs[0].long()] + offset, op.output)

    def offset(op, xs):
        """The padded input plus the constant at its integer value (a parameter, as the weights are)."""
        k = torch.from_numpy(m.tensor(op.record["offset"]).astype(np.float64)).to(dtype) * codec.params(op.output)[0]
        return codec.quantize(pad(op, codec.dequantize(xs[0], op.inputs[0]), 0.0) + k, op.output, op.record["clamp"])

    return require_all("reference", {
        "conv": weighted, "linear": weighted, "add": add, "concat": concat, "avgpool": avgpool, "lut": lut,
        "clamp": lambda op, xs: torch.clamp(xs[0], *op.record["clamp"]),
        "maxpool": lambda op, xs: maxpool(op, xs[0], float(op.record["pad_value"])),
        "reshape": lambda op, xs: reshape(op, xs[0]),
        "pad": lambda op, xs: pad(op, xs[0], float(op.record["pad_value"])),
        "matmul": matmul, "scale": scale, "layernorm": layernorm, "softmax": softmax, "embedding": embedding,
        "offset": offset, "permute": lambda op, xs: permute(op, xs[0]), "slice": lambda op, xs: slice_(op, xs[0]),
    })


def run_reference(m: Manifest, x: torch.Tensor, keep=(), dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Quantize the float input and run the reference; returns integer codes of outputs and `keep`."""
    g = m.to_graph()
    codec = Codec(m)
    with torch.no_grad():
        q = codec.quantize(x.to(dtype), g.input)
        return execute(g, q, reference_kernels(m, dtype), keep=keep)
