"""The blocks the learned rounding optimises, and their execution as the quantized model runs them.

**Blocks.** A depthwise conv filters each channel alone, so its own output error says little about
the model's; it is optimised for the output of its block. Scanning the graph in order, each learned
depthwise conv claims the nearest learned non-depthwise layer before it and the one after it, each
reached through a chain of single-input, single-consumer ops without weights (pad, clamp, lookup
table, pooling, reshape) and not yet claimed: an MBConv's expand 1×1 → depthwise → project 1×1 is
one block (the residual add after it is not part of it). Every other learned layer is a block of its
own. A block's output is its last layer's output after its fused activation and any clamp or lookup
table that is its sole consumer.

**Fake quantization.** Inside a block every tensor is put on its encoding (the encodings the
manifest will have, `calib.observers.choose_encodings`) with the fused clamp folded into the code
range, as the reference does: round half up, then clip. Gradients pass straight through inside the
range and are zero outside it. The block's output is compared before its own quantization.

**Crops (ours).** A block whose ops are all spatial (convs, pads, pools, clamps, tables) can run on
a window of its output: each op's input window follows from its kernel, stride, padding and
dilation; the part of a window outside the map is the op's padding, added explicitly, so the window
is exactly that part of the full-map output. An optimiser step on a 112×112 map then costs what one
on a CROP×CROP map does (`ptq.methods.learned.CROP`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..calib.observers import Encoding
from ..ir import Graph, Op, is_depthwise
from ..ir.floatops import apply_act, conv_float, float_kernels, linear_float

CHAIN_KINDS = ("pad", "clamp", "lut", "reshape", "maxpool", "avgpool")  # what a block may run between its layers
ACT_KINDS = ("clamp", "lut")  # activations a block's output includes
FLOAT = float_kernels(torch.float32)

Window = tuple[int, int, int, int]  # rows y0:y1, columns x0:x1


class _FakeQuant(torch.autograd.Function):
    """Codes clamp(⌊y/s + ½⌋, lo, hi) back in real units; the gradient passes where y is in range."""

    @staticmethod
    def forward(ctx, y, scale, lo, hi):
        ctx.save_for_backward((y >= lo * scale) & (y <= hi * scale))
        return y.div(scale).add_(0.5).floor_().clamp_(lo, hi).mul_(scale)

    @staticmethod
    def backward(ctx, g):
        (inside,) = ctx.saved_tensors
        return g * inside, None, None, None


Bounds = tuple[float, float, float]  # scale, lowest and highest code relative to the zero point
Drop = tuple[float, torch.Generator]  # the probability a value keeps its float value, and the masks' generator


def mixed(real: torch.Tensor, quantized: torch.Tensor, drop: Drop) -> torch.Tensor:
    """Each value float with probability drop[0], else quantized (QDrop's random drop)."""
    keep = torch.rand(real.shape, generator=drop[1]) < drop[0]
    return torch.where(keep, real, quantized)


def bounds(e: Encoding, act: list | None) -> Bounds:
    """The encoding's code range with a fused clamp folded in (quantization is monotone, so
    clipping the codes equals clamping the values first)."""
    lo, hi = e.qmin, e.qmax
    if act is not None:
        code = lambda v: min(max(math.floor(v / e.scale + 0.5) + e.zero_point, e.qmin), e.qmax)  # noqa: E731
        lo = lo if act[0] is None else max(lo, code(act[0]))
        hi = hi if act[1] is None else min(hi, code(act[1]))
    return e.scale, float(lo - e.zero_point), float(hi - e.zero_point)


def fake_quant(y: torch.Tensor, b: Bounds) -> torch.Tensor:
    """y on its encoding's grid (straight-through gradients when y needs them)."""
    if y.requires_grad:
        return _FakeQuant.apply(y, *b)
    return y.div(b[0]).add_(0.5).floor_().clamp_(b[1], b[2]).mul_(b[0])


def _geometry(op: Op) -> tuple[list[int], list[int], list[int], list[int]]:
    """Kernel, stride, padding, dilation of a windowed op (a pad op: a 1×1 window shifted by its pads)."""
    a = op.attrs
    if op.kind == "conv":
        return list(op.weight.shape[2:]), a["stride"], a["padding"], a["dilation"]
    if op.kind == "pad":
        left, top = a["pads"][0], (a["pads"][2] if len(a["pads"]) == 4 else 0)
        return [1, 1], [1, 1], [top, left], [1, 1]
    if op.kind in ("maxpool", "avgpool"):
        return a["kernel"], a["stride"], a["padding"], a.get("dilation", [1, 1])
    return [1, 1], [1, 1], [0, 0], [1, 1]


def _windowed(op: Op) -> bool:
    if op.kind == "pad":
        return len(op.attrs["pads"]) in (2, 4) and min(op.attrs["pads"]) >= 0
    if op.kind == "maxpool":
        return not op.attrs["ceil_mode"]
    if op.kind == "avgpool":
        return not op.attrs.get("global")
    return op.kind in ("conv", "clamp", "lut")


class Block:
    """Ops run together whose last output is the objective: a chain with one input tensor."""

    def __init__(self, ops: list[Op], shapes: dict[str, tuple[int, ...]]):
        self.ops = ops
        self.layers = [op for op in ops if op.weight is not None]
        self.input, self.output = ops[0].inputs[0], ops[-1].output
        self.shapes = {t: shapes[t] for t in [self.input, *(op.output for op in ops)]}
        self.windowed = all(_windowed(op) for op in ops) and len(self.shapes[self.output]) == 3

    def plan(self, y0: int, x0: int, size: int) -> tuple[Window, list[tuple[int, int, int, int]]]:
        """The input window and each op's explicit padding (left, right, top, bottom) for the output
        window of `size` at (y0, x0)."""
        h, w = self.shapes[self.output][1:]
        win = (y0, min(y0 + size, h), x0, min(x0 + size, w))
        pads = []
        for op in reversed(self.ops):
            (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _geometry(op)
            want = (win[0] * sh - ph, (win[1] - 1) * sh - ph + dh * (kh - 1) + 1,
                    win[2] * sw - pw, (win[3] - 1) * sw - pw + dw * (kw - 1) + 1)
            ih, iw = self.shapes[op.inputs[0]][1:]
            win = (max(want[0], 0), min(want[1], ih), max(want[2], 0), min(want[3], iw))
            pads.append((win[2] - want[2], want[3] - win[3], win[0] - want[0], want[1] - win[1]))
        return win, pads[::-1]

    def run(self, x: torch.Tensor, weights: dict[str, torch.Tensor], quant: dict[str, Bounds] | None,
            pads: list[tuple[int, int, int, int]] | None = None, drop: Drop | None = None,
            biases: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The block's output (before its own quantization) for input x: float when `quant` is None,
        else every inner tensor on its encoding; with `pads` (from `plan`), x is the input window;
        with `drop`, each inner value keeps its float value with that probability (`mixed`); a layer
        missing from `weights` or `biases` runs with the op's own."""
        biases = biases or {}
        for i, op in enumerate(self.ops):
            w = weights.get(op.name) if op.weight is not None else None
            if w is None and op.weight is not None:
                w = torch.from_numpy(op.weight)
            b = biases.get(op.name, _bias(op)) if op.weight is not None else None
            x = pre_act(op, [x], w, b) if pads is None else _pre_act_window(op, x, w, b, pads[i])
            if quant is None or i == len(self.ops) - 1:
                x = apply_act(op, x)
            elif drop is None:
                x = fake_quant(x, quant[op.output])
            else:
                x = mixed(apply_act(op, x), fake_quant(x, quant[op.output]), drop)
        return x


def _bias(op: Op) -> torch.Tensor | None:
    return None if op.bias is None else torch.from_numpy(op.bias)


def pre_act(op: Op, xs: list[torch.Tensor], w: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """An op before its fused activation with weight w and bias `bias` (None: the op's own; the float
    kernel for ops without weights)."""
    if op.kind == "conv":
        return conv_float(op, xs[0], w, _bias(op) if bias is None else bias)
    if op.kind == "linear":
        return linear_float(op, xs[0], w, _bias(op) if bias is None else bias)
    return FLOAT[op.kind](op, xs)


def _pre_act_window(op: Op, x: torch.Tensor, w: torch.Tensor | None, bias: torch.Tensor | None,
                    pad: tuple[int, int, int, int]) -> torch.Tensor:
    """`pre_act` on a window whose border outside the map is the op's padding, added here."""
    a = op.attrs
    if op.kind == "conv":
        return F.conv2d(F.pad(x, pad), w, bias, a["stride"], 0, a["dilation"], a["groups"])
    if op.kind == "maxpool":
        return F.max_pool2d(F.pad(x, pad, value=-math.inf), a["kernel"], a["stride"], 0, a["dilation"])
    if op.kind == "avgpool":  # count_include_pad: the padding's zeros count, as here
        return apply_act(op, F.avg_pool2d(F.pad(x, pad), a["kernel"], a["stride"], 0))
    if op.kind == "pad":
        return F.pad(x, pad, value=a["value"])
    return FLOAT[op.kind](op, [x])


def find_blocks(graph: Graph, learned: set[str]) -> list[Block]:
    """The learned layers grouped into blocks (module docstring), in the order their outputs appear."""
    consumers: dict[str, list[Op]] = {}
    for op in graph.ops:
        for t in dict.fromkeys(op.inputs):
            consumers.setdefault(t, []).append(op)
    producers = graph.producers()
    outputs = set(graph.outputs)
    claimed: set[str] = set()

    def sole_consumer(op: Op) -> Op | None:
        c = consumers.get(op.output, [])
        return c[0] if len(c) == 1 and op.output not in outputs and len(c[0].inputs) == 1 else None

    def sole_producer(op: Op) -> Op | None:
        p = producers.get(op.inputs[0]) if len(op.inputs) == 1 else None
        return p if p is not None and sole_consumer(p) is op else None

    def free(op: Op | None) -> bool:
        return op is not None and op.name in learned and op.name not in claimed and op.weight is not None \
            and not is_depthwise(op)

    def acts_after(op: Op) -> list[Op]:
        out, n = [], sole_consumer(op)
        while n is not None and n.kind in ACT_KINDS:
            out.append(n)
            n = sole_consumer(n)
        return out

    chains: list[list[Op]] = []
    for op in graph.ops:
        if op.name not in learned or not is_depthwise(op):
            continue
        head, p = [], sole_producer(op)
        while p is not None and p.kind in CHAIN_KINDS:
            head.insert(0, p)
            p = sole_producer(p)
        head = [p, *head] if free(p) else []
        tail, n = [], sole_consumer(op)
        while n is not None and n.kind in CHAIN_KINDS:
            tail.append(n)
            n = sole_consumer(n)
        tail = [*tail, n, *acts_after(n)] if free(n) else acts_after(op)
        chain = [*head, op, *tail]
        claimed.update(o.name for o in chain if o.weight is not None)
        chains.append(chain)
    for op in graph.ops:
        if free(op):
            chains.append([op, *acts_after(op)])
            claimed.add(op.name)
    index = {op.name: i for i, op in enumerate(graph.ops)}
    chains.sort(key=lambda ch: index[ch[-1].name])
    shapes = {graph.input: tuple(graph.input_shape), **{op.output: tuple(op.attrs["out_shape"]) for op in graph.ops}}
    return [Block(ch, shapes) for ch in chains]


__all__ = ["FLOAT", "Block", "Bounds", "Drop", "bounds", "fake_quant", "find_blocks", "mixed", "pre_act"]
