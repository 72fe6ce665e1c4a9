"""The model quantized so far, run op by op: where the learned rounding's blocks and the sequential
feedback rounding decide a layer's integers.

One walk in op order runs two streams over the first `rounding.samples` calibration samples (with
`rounding.flip`, followed by their mirror images: twice the samples from the same photos): the
FP32 model (the learned blocks' targets and the float-target feedback's reference inputs; it runs
only when one of them asks) and the model quantized so far (every layer's dequantized integers as
they stand, every tensor fake-quantized with the encodings the manifest will have,
`blocks.fake_quant`, and held as its codes, `Codes`). A hook sees a block's quantized-stream input
and FP32 output, or a layer's quantized-stream and FP32 inputs, and may change those layers'
integers; the quantized stream then runs on through them with the new integers. Only the tensors a
later step still needs stay alive, and the walk stops after its last hook, so its memory is a few
feature maps of the sample set. It runs single-threaded (`determinism.fixed_order`), hooks included,
except for what cannot change a bit: the codes' elementwise conversions use every thread, a weighted
layer of the quantized stream runs in fixed chunks of samples on the thread pool, each chunk on one
thread, and so do the sequential feedback's layer moments (`rounding.sequential_moments`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch

from ..calib.observers import choose_encodings
from ..ir import Graph, LayerWeights, Op
from .blocks import FLOAT, Block, Bounds, bounds, pre_act
from ..determinism import fixed_order, single_threaded_map, threads

# Samples per chunk of a weighted layer in the quantized stream: fixed, since a conv's last bits depend on
# the batch it is given. On this machine's CPU a chunk of 16 gives the bits of all samples at once
# (which the walk ran before), where 8 does not for a 1×1 conv.
LAYER_CHUNK = 16

BlockHook = Callable[[Block, torch.Tensor, torch.Tensor, dict[str, Bounds], torch.Tensor], None]
LayerHook = Callable[[Op, torch.Tensor, torch.Tensor | None], None]


class Codes:
    """A fake-quantized tensor held as its codes: one byte per value where the code range spans at
    most 256 (an 8-bit tensor takes a quarter of its float32 size), else the float32 codes. `real`
    gives back the values fake quantization gave, bit for bit: the code (a whole number, exact in
    float32) times the scale, the product fake quantization rounds too."""

    def __init__(self, parts: Iterable[torch.Tensor], b: Bounds, workers: int | None = None, encoded: bool = False):
        """The codes of the real tensor whose mini-batches `parts` yields (only one is real at a time),
        or, `encoded`, the mini-batches' codes themselves (`encode`); the conversions to and from codes,
        elementwise, run on `workers` threads (default: torch's count now), which cannot change their bits."""
        self.scale, self.lo = b[0], b[1]
        self.narrow = one_byte(b)
        self.workers = torch.get_num_threads() if workers is None else workers
        if encoded:
            codes = list(parts)
        else:
            codes = []
            for y in parts:  # each part computed outside `threads`: a conv's bits depend on the thread count
                with threads(self.workers):
                    codes.append(encode(y, b))
        with threads(self.workers):
            self.codes = torch.cat(codes)

    def real(self, part: slice = slice(None), here: bool = False) -> torch.Tensor:
        """The values of samples `part`; `here`: in the calling thread alone (a worker of a pool, which
        must not change torch's process-wide thread count while another worker runs a conv)."""
        c = self.codes[part]
        with nullcontext() if here else threads(self.workers):
            return c.float().add_(self.lo).mul_(self.scale) if self.narrow else c.mul(self.scale)


def one_byte(b: Bounds) -> bool:
    """Whether a tensor's codes (bounds b) fit one byte each: a range of at most 256 codes."""
    return b[2] - b[1] <= 255


def encode(y: torch.Tensor, b: Bounds) -> torch.Tensor:
    """The codes `Codes` holds for the real tensor y: uint8 offsets from the least code where they
    fit one byte, else the float32 codes."""
    c = y.div(b[0]).add_(0.5).floor_().clamp_(b[1], b[2])
    return c.sub_(b[1]).to(torch.uint8) if one_byte(b) else c


def mirrors(graph: Graph, settings: dict) -> bool:
    """Whether the walk also runs each sample's mirror image: `rounding.flip` on an image input (C, H, W)."""
    return settings["flip"] and len(graph.input_shape) == 3


def _schedule(graph: Graph, blocks: list[Block], layers: set[str]) -> list[Op | Block]:
    """The ops in graph order with each block's ops run together at its last op, up to the last hook."""
    owner = {op.name: b for b in blocks for op in b.ops}
    steps: list[Op | Block] = []
    for op in graph.ops:
        b = owner.get(op.name)
        if b is None:
            steps.append(op)
        elif op is b.ops[-1]:
            steps.append(b)
    hooked = [i for i, s in enumerate(steps) if isinstance(s, Block) or s.name in layers]
    return steps[:hooked[-1] + 1] if hooked else []


def _slices(n: int, size: int) -> list[slice]:
    """Consecutive slices of `size` samples covering n (the last may be shorter)."""
    return [slice(j, j + size) for j in range(0, n, size)]


def _inputs(step: Op | Block) -> list[str]:
    return [step.input] if isinstance(step, Block) else step.inputs


def walk(graph: Graph, stats, recipe: dict, weights: LayerWeights, blocks: list[Block], on_block: BlockHook | None = None,
         layers: Iterable[str] = (), on_layer: LayerHook | None = None, float_inputs: bool = False) -> None:
    """Run the two streams (module docstring), calling `on_block(block, quantized input, FP32 output,
    every tensor's code bounds, FP32 input)` for each block and `on_layer(op, quantized input, FP32 input or None)`
    before each of `layers` runs; the FP32 input is there when `float_inputs` asks for it."""
    settings = recipe["rounding"]
    enc = choose_encodings(graph, stats.histograms, recipe, weights)
    producers = graph.producers()
    quant = {t: bounds(e, producers[t].attrs.get("act") if t in producers else None) for t, e in enc.items()}
    layers = set(layers)
    steps = _schedule(graph, blocks, layers)
    last_use = {t: i for i, s in enumerate(steps) for t in _inputs(s)}
    size = settings["batch_size"]

    def dequantized(op: Op) -> torch.Tensor:
        return torch.from_numpy(weights[op.name].dequantized()).float()

    def bias(op: Op) -> torch.Tensor | None:
        """A bias the learned rounding moved, else None (the op's own)."""
        b = weights[op.name].bias
        return None if b is None else torch.from_numpy(b).float()

    workers = torch.get_num_threads()  # for the elementwise code conversions (`Codes`) inside the single-threaded walk
    with fixed_order(), torch.no_grad():
        x = torch.cat(list(stats.replay(settings["samples"], size))).float()
        if mirrors(graph, settings):  # each image mirrored left to right
            x = torch.cat([x, x.flip(-1)])
        fp = {graph.input: x} if blocks or float_inputs else None
        parts = _slices(x.shape[0], size)  # mini-batches: bounded intermediates
        qx = {graph.input: Codes((x[p] for p in parts), quant[graph.input], workers)}  # the quantized stream, as codes
        layer_chunks = _slices(x.shape[0], LAYER_CHUNK)
        for i, s in enumerate(steps):
            if isinstance(s, Block):
                target = torch.cat([s.run(fp[s.input][p], {}, None) for p in parts])
                on_block(s, qx[s.input].real(), target, quant, fp[s.input])
                ws = {op.name: dequantized(op) for op in s.layers}
                bs = {op.name: b for op in s.layers if (b := bias(op)) is not None}
                qx[s.output] = Codes((s.run(qx[s.input].real(p), ws, quant, biases=bs) for p in parts), quant[s.output], workers)
                fp[s.output] = target
            else:
                if s.name in layers:
                    on_layer(s, qx[s.inputs[0]].real(), None if fp is None else fp[s.inputs[0]])
                if fp is not None:
                    fp[s.output] = FLOAT[s.kind](s, [fp[t] for t in s.inputs])
                if s.weight is None:  # the ops without weights: a mini-batch at a time
                    qx[s.output] = Codes((pre_act(s, [qx[t].real(p) for t in s.inputs], None) for p in parts),
                                         quant[s.output], workers)
                else:
                    def layer_codes(p: slice, s: Op = s, w: torch.Tensor = dequantized(s), b: torch.Tensor | None = bias(s)):
                        return encode(pre_act(s, [qx[t].real(p, here=True) for t in s.inputs], w, b), quant[s.output])

                    qx[s.output] = Codes(single_threaded_map(layer_codes, layer_chunks), quant[s.output], workers, encoded=True)
            for t in _inputs(s):
                if last_use[t] == i:
                    qx.pop(t, None)
                    if fp is not None:
                        fp.pop(t, None)


__all__ = ["BlockHook", "Codes", "LayerHook", "mirrors", "walk"]
