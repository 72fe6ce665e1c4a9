"""Empirical bias correction: remove each layer's mean output shift caused by quantization.

Layers are visited in order with the FP32 graph and the fake-quant model running side by side on
calibration data, so the shift measured at a layer includes everything upstream (activation
quantization and earlier corrections). (Averaging the shift only where a fused clamp does not bind
was measured too: better for `all`, catastrophic for depthwise layers at 4 bits, so not used.)
Correcting every layer blindly hurts (docs/ALGORITHMS.md); `layer` keeps a layer's correction only where
it lowers the error of its own quantized output, and the recipe default `auto` tries none,
depthwise-only and all, and keeps whichever gives the lowest end-to-end KL on calibration data.
In a text encoder both the shifts and the KL are measured at kept tokens only (`calib.tokens`): its
padded positions fall outside the calibrated ranges, and their clipped errors once turned the
shifts of all-MiniLM-L6-v2 at 4 bits into a collapse (sentence cosine 0.52 instead of 0.98).
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from .calib.progress import progress
from .calib.tokens import at_kept, kept_tokens
from .ir import Graph, is_depthwise
from .ir.floatops import apply_act, conv_float, float_kernels, linear_float
from .manifest import Manifest
from .manifest.build import set_bias
from .metrics import fidelity
from .runtime.reference import Codec, dequantized_weight, reference_kernels

MODES = ("auto", "layer", "all", "depthwise", "none")
AUTO_CANDIDATES = ("none", "depthwise", "all", "layer")


def choose_and_correct(graph: Graph, m: Manifest, x: torch.Tensor, mode: str) -> dict:
    """Apply bias correction in `mode` (for `auto`, the candidate with the least calibration KL)."""
    if mode != "auto":
        (kept,), _, _ = correct_biases(graph, [m], x, [mode])
        return {"mode": mode, "corrected": sorted(k for k, v in kept.items() if v)}
    trials = [Manifest(copy.deepcopy(m.data), dict(m.tensors)) for _ in AUTO_CANDIDATES]
    kept, fp, fqs = correct_biases(graph, trials, x, list(AUTO_CANDIDATES))
    out = graph.outputs[0]
    keep = _keep(graph, x)
    kls = [fidelity(at_kept(fp, keep).numpy(), at_kept(Codec(t).dequantize(fq, out), keep).numpy())["kl"]
           for t, fq in zip(trials, fqs)]
    best = min(range(len(AUTO_CANDIDATES)), key=lambda i: kls[i])
    m.data, m.tensors = trials[best].data, trials[best].tensors
    return {"mode": "auto", "chosen": AUTO_CANDIDATES[best], "calibration_kl": dict(zip(AUTO_CANDIDATES, kls)),
            "corrected": sorted(k for k, v in kept[best].items() if v)}


def correct_biases(graph: Graph, ms: list[Manifest], x: torch.Tensor, modes: list[str]):
    """Update each manifest's biases in place, manifest i in modes[i], all in one sweep that shares
    the FP32 side; returns (kept per layer of each, FP32 output, fake-quant output of each).

    Candidates whose fake-quant tensors are still the same share one stream, computed once, until a
    layer's decision parts them: `none` and `depthwise` on a network without depthwise convs never
    part, `all` and `layer` only where the layer mode first rejects a correction."""
    dtype = torch.float32
    fk = float_kernels(dtype)
    keep = _keep(graph, x)
    kernels = [reference_kernels(m, dtype) for m in ms]
    records = [{r["name"]: r for r in m.ops} for m in ms]
    codec = Codec(ms[0])  # the candidates differ in biases only: one set of encodings
    last_use = {}
    for i, op in enumerate(graph.ops):
        for t in op.inputs:
            last_use[t] = i
    fp = {graph.input: x.to(dtype)}
    streams = [({graph.input: _compact(codec, graph.input, codec.quantize(x.to(dtype), graph.input))}, list(range(len(ms))))]
    kept: list[dict[str, bool]] = [{} for _ in ms]
    with torch.no_grad(), progress(f"bias correction ({len(ms)} candidate(s), ops)", len(graph.ops)) as advance:
        for i, op in enumerate(graph.ops):
            advance()
            xs_fp = [fp[t] for t in op.inputs]
            pre_fp = None
            if op.weight is not None:
                f = conv_float if op.kind == "conv" else linear_float
                b = torch.from_numpy(op.bias.astype(np.float64)).to(dtype)
                pre_fp = f(op, xs_fp[0], torch.from_numpy(op.weight).to(dtype), b)
                y_fp = apply_act(op, pre_fp)
            else:
                y_fp = fk[op.kind](op, xs_fp)
            parted = []
            for fq, members in streams:
                xs_fq = [fq[t].to(dtype) for t in op.inputs]
                correcting = [j for j in members if pre_fp is not None and modes[j] != "none"
                              and (modes[j] != "depthwise" or is_depthwise(op))]
                outputs = []  # (members, y)
                plain = [j for j in members if j not in correcting]
                if plain:
                    qop = type(op)(op.name, op.kind, op.inputs, op.output, op.attrs, record=records[plain[0]][op.name])
                    outputs.append((plain, kernels[plain[0]][op.kind](qop, xs_fq)))
                if correcting:
                    first = correcting[0]
                    judge = any(modes[j] == "layer" for j in correcting)
                    delta, y0, y1, better = _measure_layer(op, records[first][op.name], ms[first], codec, b, pre_fp, y_fp,
                                                           xs_fq[0], dtype, judge, keep)
                    for j in correcting:
                        kept[j][op.name] = modes[j] != "layer" or better
                        if kept[j][op.name]:
                            set_bias(ms[j], records[j][op.name], op.bias.astype(np.float64) + delta.double().numpy(), corrected=True)
                    outputs += [(js, y) for js, y in (([j for j in correcting if kept[j][op.name]], y1),
                                                     ([j for j in correcting if not kept[j][op.name]], y0)) if js]
                for n, (js, y) in enumerate(outputs):
                    part = fq if n == len(outputs) - 1 else dict(fq)  # the tensors themselves are shared
                    part[op.output] = _compact(codec, op.output, y)
                    parted.append((part, js))
            streams = parted
            fp[op.output] = y_fp
            for t in set(op.inputs):
                if last_use.get(t) == i and t not in graph.outputs:
                    fp.pop(t, None)
                    for fq, _ in streams:
                        fq.pop(t, None)
    out = graph.outputs[0]
    fq_out = {j: fq[out].to(dtype) for fq, js in streams for j in js}
    return kept, fp[out], [fq_out[j] for j in range(len(ms))]


def _compact(codec: Codec, t: str, codes: torch.Tensor) -> torch.Tensor:
    """Codes of a tensor of at most 8 bits as uint8 (exact: whole numbers in [0, 255]), so the
    candidates' fake-quant streams take a quarter of the FP32 stream's memory; wider ones as they are."""
    e = codec.enc.get(t)
    return codes.to(torch.uint8) if e is not None and e["bits"] <= 8 else codes


def _keep(graph: Graph, x: torch.Tensor) -> torch.Tensor | None:
    """A text encoder's kept tokens in x (`calib.tokens`): the shifts and errors are measured there only."""
    tokens = kept_tokens(graph)
    return tokens(x) if tokens is not None else None


def _measure_layer(op, rec, m: Manifest, codec: Codec, b, pre_fp, y_fp, x_fq, dtype, judge: bool, tokens=None):
    """(mean shift δ, fake-quant output without and with δ added, whether δ lowers the layer's own
    output error — asked only when `judge`); `b` is the FP32 bias; `tokens` the kept tokens of a text
    encoder's (N, T, C) tensors."""
    f = conv_float if op.kind == "conv" else linear_float
    pre_q = f(op, codec.dequantize(x_fq, op.inputs[0]), dequantized_weight(m, rec, dtype), b)
    dims = [0, 2, 3] if pre_q.dim() == 4 else list(range(pre_q.dim() - 1))  # linear: features last
    view = (1, -1, 1, 1) if pre_q.dim() == 4 else (-1,)
    shift = at_kept(pre_fp - pre_q, tokens)
    delta = shift.mean(dim=dims if shift.dim() == pre_q.dim() else 0)

    def quantized(pre):
        return codec.quantize(pre, op.output, rec["clamp"])

    y0, y1 = quantized(pre_q), quantized(pre_q + delta.reshape(view))
    if not judge:
        return delta, y0, y1, None
    e0 = float(((at_kept(codec.dequantize(y0, op.output) - y_fp, tokens)) ** 2).mean())
    e1 = float(((at_kept(codec.dequantize(y1, op.output) - y_fp, tokens)) ** 2).mean())
    return delta, y0, y1, e1 < e0
