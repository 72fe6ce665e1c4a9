"""Empirical bias correction: remove each layer's mean output shift caused by quantization.

Layers are visited in order, the fake-quant model on calibration data against the FP32 graph's
mean pre-activations on the same data, so the shift measured at a layer includes everything
upstream (activation quantization and earlier corrections). (Averaging the shift only where a
fused clamp does not bind was measured too: better for `all`, catastrophic for depthwise layers at
4 bits, so not used.)
Correcting every layer blindly hurts (docs/ALGORITHMS.md); `layer` keeps a layer's correction only where
it lowers the error of its own quantized output, and the recipe default `auto` tries none,
depthwise-only and all on `bias_correction.choose_samples` of the samples spread evenly over them
(32 of 128 by default), and keeps the simplest whose end-to-end KL there is within CHOICE_MARGIN of
the lowest. `layer` is not among `auto`'s candidates: it judges each layer against FP32 maps held
for every sample, which took 45% of Lite0 `w8a8`'s comparison, and on real weights it never won
it (26 comparisons of 11 recipes on three Lite0 draws; it kept nearly every correction, as `all`;
BENCHMARKS.md, session 38).
In a text encoder both the shifts and the KL are measured at kept tokens only (`calib.tokens`): its
padded positions fall outside the calibrated ranges, and their clipped errors once turned the
shifts of all-MiniLM-L6-v2 at 4 bits into a collapse (sentence cosine 0.52 instead of 0.98).
"""
from __future__ import annotations

import copy
import threading

import numpy as np
import torch

from .calib.preact import channel_sums
from .calib.progress import progress
from .calib.tokens import at_kept, kept_tokens
from .determinism import single_threaded_map
from .ir import Graph, execute, is_depthwise
from .ir.floatops import apply_act, conv_float, float_kernels, linear_float
from .manifest import Manifest
from .manifest.build import set_bias
from .memory import release_freed_memory
from .metrics import fidelity
from .runtime.reference import Codec, dequantized_weight, reference_kernels

MODES = ("auto", "layer", "all", "depthwise", "none")
AUTO_CANDIDATES = ("none", "depthwise", "all")  # simplest first
# `auto` keeps the simplest candidate whose calibration KL is within this share of the lowest. On 32
# samples two candidates' KLs can sit 2% apart and swap with a last-bit change of the statistics:
# Lite0 `w8a8` on draw 0 once chose `layer` at 0.00345 against `depthwise` at 0.00354, and measured a
# held-out KL of 0.0042 against 0.0031 (BENCHMARKS.md, session 33); the more flexible candidate fits
# the samples it is chosen on more closely than it generalises.
CHOICE_MARGIN = 0.05


def choose_and_correct(graph: Graph, m: Manifest, x: torch.Tensor, mode: str, choose_on: int | None = None,
                       float_sums: dict[str, tuple[np.ndarray, int]] | None = None) -> dict:
    """Apply bias correction in `mode`; for `auto`, in the simplest candidate whose calibration KL is
    within CHOICE_MARGIN of the least. `float_sums`, when given, are the FP32 pre-activation sums of
    all of x (`Statistics.pre_act_sums`), which a sweep over all of x without `layer` then takes
    instead of running the FP32 model again.

    `auto` compares its candidates on `choose_on` of the samples spread evenly over them (all of them
    when None; a calibration set often comes photo by photo or class by class, so not the first
    ones), then measures the chosen mode alone on all of them: the biases are those a comparison on
    all would give wherever it would choose the same mode, in 62–85% of the time on Lite0 (the
    candidates share one sweep but run a quantized stream each, the chosen mode one;
    BENCHMARKS.md, session 30)."""
    if mode == "none":
        return {"mode": mode, "corrected": []}
    if mode != "auto":
        (kept,), _, _ = correct_biases(graph, [m], x, [mode], float_sums)
        return {"mode": mode, "corrected": sorted(k for k, v in kept.items() if v)}
    n = len(x) if choose_on is None else min(choose_on, len(x))
    some = spread(x, n)
    trials = [Manifest(copy.deepcopy(m.data), dict(m.tensors)) for _ in AUTO_CANDIDATES]
    kept, fp, fqs = correct_biases(graph, trials, some, list(AUTO_CANDIDATES))
    out = graph.outputs[0]
    keep = _keep(graph, some)
    kls = [fidelity(at_kept(fp, keep).numpy(), at_kept(Codec(t).dequantize(fq, out), keep).numpy())["kl"]
           for t, fq in zip(trials, fqs)]
    best = simplest_within(kls, CHOICE_MARGIN)
    chosen = AUTO_CANDIDATES[best]
    del fp, fqs, some
    if n == len(x) or chosen == "none":
        m.data, m.tensors = trials[best].data, trials[best].tensors
        corrected = kept[best]
    else:
        del trials
        (corrected,), _, _ = correct_biases(graph, [m], x, [chosen], float_sums)
    return {"mode": "auto", "chosen": chosen, "chosen_on": n, "calibration_kl": dict(zip(AUTO_CANDIDATES, kls)),
            "corrected": sorted(k for k, v in corrected.items() if v)}


def simplest_within(kls: list[float], margin: float) -> int:
    """The first candidate (simplest first) whose KL is at most (1 + margin) times the lowest."""
    lowest = min(kls)
    return next(i for i, k in enumerate(kls) if k <= lowest * (1 + margin))


def spread(x: torch.Tensor, n: int) -> torch.Tensor:
    """n of x's samples spread evenly over it (sample i·len(x)/n); all of x where n ≥ len(x)."""
    return x if n >= len(x) else x[(torch.arange(n) * len(x)) // n]


def correct_biases(graph: Graph, ms: list[Manifest], x: torch.Tensor, modes: list[str],
                   float_sums: dict[str, tuple[np.ndarray, int]] | None = None):
    """Update each manifest's biases in place, manifest i in modes[i], all in one sweep that shares
    the FP32 side; returns (kept per layer of each, FP32 output (None where `float_sums` stood in
    for the FP32 model), fake-quant output of each).

    Candidates whose fake-quant tensors are still the same share one stream, computed once, until a
    layer's decision parts them: `none` and `depthwise` on a network without depthwise convs never
    part, `all` and `layer` only where the layer mode first rejects a correction.

    Every op runs `CHUNK` samples at a time, so what a layer adds to the held frontier (each stream's
    codes of every sample, and the FP32 maps where `layer` judges) is its output alone, not its float
    temporaries of every sample: resnet50 `w8a8` on 128 samples peaked at 6.4 GiB when each op ran on
    the whole batch. Without `layer`, the FP32 side is its per-channel sums alone (`_float_sums`): on
    Lite0 a sweep of `depthwise` or `all` took 27–29% less time (BENCHMARKS.md, session 36); with
    `float_sums` (x's, from the statistics pass) not even those are computed here."""
    dtype = torch.float32
    fk = float_kernels(dtype)
    parts = _chunks(len(x))
    keep = _keep(graph, x)
    kernels = [reference_kernels(m, dtype, exact_sums=False) for m in ms]  # the kernels its figures were measured on
    records = [{r["name"]: r for r in m.ops} for m in ms]
    codec = Codec(ms[0])  # the candidates differ in biases only: one set of encodings
    last_use = {}
    for i, op in enumerate(graph.ops):
        for t in op.inputs:
            last_use[t] = i
    for i, op in reversed(list(enumerate(graph.ops))):  # a lazy output reads its source until its own last use
        if op.kind in LAZY_KINDS:
            last_use[op.inputs[0]] = max(last_use[op.inputs[0]], last_use.get(op.output, i))
    x = x.to(dtype)
    # the FP32 side's maps are read again only to judge a layer (`layer`); the other modes need its
    # per-channel sums alone, taken in one pass that runs each mini-batch through the whole network
    judging = "layer" in modes
    fp = {graph.input: x}
    if judging:
        fp_sums, fp_out = None, None
    elif float_sums is not None:
        fp_sums, fp_out = {name: _ChannelSums.of(*s) for name, s in float_sums.items()}, None
    else:
        fp_sums, fp_out = _float_sums(graph, x, parts, keep)
    streams = [({graph.input: _stitch(parts, lambda s: _compact(codec, graph.input, codec.quantize(x[s], graph.input)))},
                list(range(len(ms))))]
    kept: list[dict[str, bool]] = [{} for _ in ms]
    with torch.no_grad(), progress(f"bias correction ({len(ms)} candidate(s), ops)", len(graph.ops)) as advance:
        for i, op in enumerate(graph.ops):
            advance()
            # maps read here for the last time, whose memory this op's output may take (a residual
            # add's output takes an input's); the input x is the caller's, and no FP32 map is a view
            # of another (`_stitch` copies each op's output into a tensor of its own)
            dying = [t for t in dict.fromkeys(op.inputs) if last_use[t] == i and t not in graph.outputs]
            if op.kind in LAZY_KINDS and op.output not in graph.outputs:
                if judging:
                    fp[op.output] = _Lazy(fp[op.inputs[0]], lambda r, op=op: fk[op.kind](op, [r]))
                for fq, members in streams:
                    qop = type(op)(op.name, op.kind, op.inputs, op.output, op.attrs, record=records[members[0]][op.name])
                    fq[op.output] = _Lazy(fq[op.inputs[0]], lambda r, qop=qop, k=kernels[members[0]][op.kind]: _lazy_codes(
                        codec, qop, k, r))
                _forget(op, i, graph, last_use, fp, streams)
                continue
            y_fp = None
            if not judging:
                fp_sum = fp_sums.get(op.name)
            else:
                fp_sum, y_fp = _float_layer(op, [fp[t] for t in op.inputs], parts, keep, fk,
                                            [fp[t] for t in dying if t != graph.input and isinstance(fp[t], torch.Tensor)])
                fp[op.output] = y_fp
            parted = []
            for fq, members in streams:
                correcting = [j for j in members if fp_sum is not None and modes[j] != "none"
                              and (modes[j] != "depthwise" or is_depthwise(op))]
                outputs = []  # (members, codes)
                plain = [j for j in members if j not in correcting]
                if plain:
                    qop = type(op)(op.name, op.kind, op.inputs, op.output, op.attrs, record=records[plain[0]][op.name])
                    kernel = kernels[plain[0]][op.kind]
                    # this stream's codes read for the last time, unless the correction reads them again
                    # below or another stream holds the same tensor (streams share what they had in common)
                    own = [] if correcting else [fq[t] for t in dying if isinstance(fq[t], torch.Tensor) and not any(
                        other is not fq and other.get(t) is fq[t] for other, _ in streams + parted)]
                    outputs.append((plain, _stitch(parts, lambda s: _compact(
                        codec, op.output, kernel(qop, [fq[t][s].to(dtype) for t in op.inputs])), own)))
                if correcting:
                    first = correcting[0]
                    judge = any(modes[j] == "layer" for j in correcting)
                    # the stream's own bias: the method's (learned rounding may have moved it), the same in
                    # every member until this layer's correction parts them
                    base = ms[first].tensor(records[first][op.name]["bias"]["float"])
                    delta, y0, y1, better = _measure_layer(op, records[first][op.name], ms[first], codec,
                                                           torch.from_numpy(base).to(dtype), fp_sum, y_fp,
                                                           fq[op.inputs[0]], parts, judge, keep)
                    for j in correcting:
                        kept[j][op.name] = modes[j] != "layer" or better
                        if kept[j][op.name]:
                            set_bias(ms[j], records[j][op.name], base + delta.double().numpy(), corrected=True)
                    outputs += [(js, y) for js, y in (([j for j in correcting if kept[j][op.name]], y1),
                                                     ([j for j in correcting if not kept[j][op.name]], y0)) if js]
                for n, (js, y) in enumerate(outputs):
                    part = fq if n == len(outputs) - 1 else dict(fq)  # the tensors themselves are shared
                    part[op.output] = y
                    parted.append((part, js))
            streams = parted
            _forget(op, i, graph, last_use, fp, streams)
    out = graph.outputs[0]
    fq_out = {j: fq[out].to(dtype) for fq, js in streams for j in js}
    return kept, fp[out] if judging else fp_out, [fq_out[j] for j in range(len(ms))]


def _float_layer(op, xs: list, parts: list[slice], keep, fk: dict, spare: list[torch.Tensor]):
    """(Σ of a weighted op's FP32 pre-activation per output channel at kept tokens, or None; its FP32
    output of every sample, held for the `layer` judge downstream)."""
    if op.weight is None:
        return None, _stitch(parts, lambda s: fk[op.kind](op, [t[s] for t in xs]), spare)
    f, (w, b) = _float_layer_params(op)
    sums = _ChannelSums()

    def chunk(s):
        pre = f(op, xs[0][s], w, b)
        return apply_act(op, pre), channel_sums(pre, _rows(keep, s))

    return sums, _stitch(parts, chunk, spare, lambda s, part: sums.add(*part))


def _float_layer_params(op):
    """(conv or linear, FP32 weight, FP32 bias) of a weighted op, as the FP32 side runs it."""
    f = conv_float if op.kind == "conv" else linear_float
    return f, (torch.from_numpy(op.weight).to(torch.float32), torch.from_numpy(op.bias.astype(np.float64)).to(torch.float32))


def _float_sums(graph: Graph, x: torch.Tensor, parts: list[slice], keep):
    """({weighted op: Σ of its FP32 pre-activation per output channel at kept tokens}, FP32 output),
    each mini-batch run through the whole network on its own: no op's map of every sample is held.
    Every mini-batch computes what `_float_layer` computes for its rows, from contiguous inputs as
    `_stitch` leaves them, and the sums add in mini-batch order: the same bits, without the FP32
    maps' memory and the copies into them."""
    def run(s: slice):
        sums = {}

        def on_pre_act(op, pre):
            sums[op.name] = channel_sums(pre, _rows(keep, s))

        kernels = {kind: (lambda op, xs, k=k: k(op, xs).contiguous())
                   for kind, k in float_kernels(torch.float32, on_pre_act).items()}
        return sums, execute(graph, x[s], kernels)[graph.outputs[0]]

    totals = {op.name: _ChannelSums() for op in graph.weighted_ops()}
    outputs = []
    with progress("bias correction: FP32 sums (mini-batches)", len(parts)) as advance:
        for sums, y in single_threaded_map(run, parts):
            for name, part in sums.items():
                totals[name].add(*part)
            outputs.append(y)
            advance()
    return totals, torch.cat(outputs)


def _forget(op, i: int, graph: Graph, last_use: dict[str, int], fp: dict, streams: list) -> None:
    """Drop the tensors read for the last time at op i (its inputs, and the source of a lazy input),
    and hand the freed pages back to the OS."""
    for t in {t for t, last in last_use.items() if last == i} - set(graph.outputs):
        fp.pop(t, None)
        for fq, _ in streams:
            fq.pop(t, None)
    # at each op, not only between stages: under the command line's allocator (`memory.reuse_freed_memory`)
    # the heap otherwise keeps the holes that whole-calibration maps leave among the mini-batches'
    # blocks, and resnet50 `multipoint` peaked at 3.58 GiB here instead of 3.26 (BENCHMARKS.md, session 29)
    release_freed_memory()


# Ops whose output is computed per mini-batch when read, never held: a pad's output is larger than
# its input, and on EfficientNet-Lite0 its 17 explicit pads (TensorFlow "same" padding) held a second
# copy of the 96-channel 112×112 maps, in FP32 and in every candidate's codes.
LAZY_KINDS = ("pad",)


class _Lazy:
    """An op's output as rows of its source tensor passed through `rows` when indexed by a mini-batch."""

    def __init__(self, source, rows) -> None:
        self.source, self.rows = source, rows

    def __getitem__(self, s: slice) -> torch.Tensor:
        return self.rows(self.source[s])


def _lazy_codes(codec: Codec, qop, kernel, r: torch.Tensor) -> torch.Tensor:
    """A lazy op's codes of one mini-batch. A pad only copies codes and adds the pad value (the input's
    zero point, a code itself): done on the uint8 codes as they are, not in float and compacted again."""
    if qop.kind == "pad" and r.dtype == torch.uint8:
        return kernel(qop, [r])
    return _compact(codec, qop.output, kernel(qop, [r.to(torch.float32)]))


def _compact(codec: Codec, t: str, codes: torch.Tensor) -> torch.Tensor:
    """Codes of a tensor of at most 8 bits as uint8 (exact: whole numbers in [0, 255]), so the
    candidates' fake-quant streams take a quarter of the FP32 stream's memory; wider ones as they are."""
    e = codec.enc.get(t)
    if e is None or e["bits"] > 8:
        return codes
    if codes.device.type == "cpu":  # numpy's float32 → uint8 cast is 3× torch's on this machine's CPU
        return torch.from_numpy(codes.numpy().astype(np.uint8))
    return codes.to(torch.uint8)


def _keep(graph: Graph, x: torch.Tensor) -> torch.Tensor | None:
    """A text encoder's kept tokens in x (`calib.tokens`): the shifts and errors are measured there only."""
    tokens = kept_tokens(graph)
    return tokens(x) if tokens is not None else None


# Samples per mini-batch of every op: fixed, so a conv's last bits do not depend on `samples`. Small
# enough that a mini-batch's temporaries stay under glibc's 32 MB mmap threshold and are reused, not
# mapped and zeroed afresh: with 128 samples on Lite0, 8 and 16 took 28 s where 32 took 48-60 s; on
# resnet50, 8 took 35 s where 16 took 47 s, and the peak was no higher (BENCHMARKS.md, session 23).
CHUNK = 8
# A layer's quantized pre-activations are held for the second pass up to this size, else recomputed
# (the same bits). At 256 MiB resnet50 held its 196 MiB maps (128 samples) and `multipoint` peaked at
# 3.57-3.92 GiB, over 4 GB; at 128 MiB 3.29 GiB, for 21% more bias-correction time on Lite0, whose
# 196 MiB maps are recomputed now (BENCHMARKS.md, session 25).
HOLD_BYTES = 128 << 20


def _chunks(n: int) -> list[slice]:
    return [slice(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]


def _stitch(parts: list[slice], chunk, spare: list[torch.Tensor] = (), take=None) -> torch.Tensor:
    """chunk(s) for every mini-batch s, written into one tensor of all samples: the first of `spare`
    of its shape and type (an input this op reads for the last time; mini-batch s reads only its rows
    s, so they are overwritten only after they are read), else a new one. With `take`, chunk(s)
    returns (output, extra) and take(s, extra) runs here, in mini-batch order.

    Mini-batches run on a thread pool, each single-threaded (`single_threaded_map`): a conv of 8
    samples sums in another order at 2 threads than at 1, and the biases' last bits would follow.
    Each writes its own rows from its own thread: copied here, in one thread, the rows took a
    fifth of Lite0's bias correction while the pool waited (BENCHMARKS.md, session 32)."""
    held: list[torch.Tensor] = []  # the tensor of all samples, made by the first mini-batch to finish
    lock = threading.Lock()

    def write(s: slice):
        y = chunk(s)
        extra = None
        if take is not None:
            y, extra = y
        with lock:
            if not held:
                shape = (parts[-1].stop, *y.shape[1:])
                out = next((t for t in spare if t.shape == shape and t.dtype == y.dtype), None)
                held.append(y.new_empty(shape) if out is None else out)
        out = held[0]
        if y.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            y = y.clone()  # a reshape or permute of the spare input itself
        out[s] = y
        return extra

    for s, extra in zip(parts, single_threaded_map(write, parts)):
        if take is not None:
            take(s, extra)
    return held[0]


def _rows(keep: torch.Tensor | None, s: slice) -> torch.Tensor | None:
    return None if keep is None else keep[s]


class _ChannelSums:
    """A layer's pre-activation sums per output channel over its mini-batches (`calib.preact.channel_sums`)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    @staticmethod
    def of(total: np.ndarray, count: int) -> "_ChannelSums":
        """Sums taken elsewhere (`Statistics.pre_act_sums`)."""
        out = _ChannelSums()
        out.total, out.count = torch.from_numpy(total), count
        return out

    def add(self, s: torch.Tensor, count: int) -> None:
        self.total = self.total + s
        self.count += count

    def mean(self) -> torch.Tensor:
        return self.total / self.count


def _measure_layer(op, rec, m: Manifest, codec: Codec, b, fp_sum: _ChannelSums, y_fp, x_fq, parts, judge: bool, tokens=None):
    """(mean shift δ, output codes without δ (only when `judge`, else None) and with δ added, whether
    δ lowers the layer's own output error — asked only when `judge`); `b` is the quantized model's
    float bias before the correction, `fp_sum` the FP32 pre-activation's sums, `tokens` the kept
    tokens of a text encoder's (N, T, C) tensors. Two passes over the mini-batches: the first sums
    the quantized pre-activation, the second adds δ to it."""
    dtype = torch.float32
    f = conv_float if op.kind == "conv" else linear_float
    wq = dequantized_weight(m, rec, dtype)
    held: dict[int, torch.Tensor] = {}  # first sample of a mini-batch → its quantized pre-activation
    q_sum = _ChannelSums()

    def pre_q(s: slice) -> torch.Tensor:
        if s.start in held:
            return held.pop(s.start)
        return f(op, codec.dequantize(x_fq[s].to(dtype), op.inputs[0]), wq, b)

    def quantized(pre):
        return _compact(codec, op.output, codec.quantize(pre, op.output, rec["clamp"]))

    size = 0

    def sums_only(s: slice):
        pre = pre_q(s)
        return pre, channel_sums(pre, _rows(tokens, s))

    def first_pass(s: slice):
        pre, sums = sums_only(s)
        return quantized(pre), (pre, sums)

    def hold(s: slice, extra) -> None:
        nonlocal size
        pre, sums = extra
        q_sum.add(*sums)
        if size + pre.nbytes <= HOLD_BYTES:
            held[s.start] = pre
            size += pre.nbytes

    y0 = None  # the uncorrected codes: read only by the judge (outside `layer`, every correction is kept)
    if judge:
        y0 = _stitch(parts, first_pass, take=hold)
    else:
        for s, extra in zip(parts, single_threaded_map(sums_only, parts)):
            hold(s, extra)
    delta = (fp_sum.mean() - q_sum.mean()).to(dtype)
    view = (1, -1, 1, 1) if op.kind == "conv" else (-1,)
    errors = [0.0, 0.0]

    def second_pass(s: slice):
        y1 = quantized(pre_q(s).add_(delta.reshape(view)))  # a held chunk is popped: it is this pass's own
        if not judge:
            return y1, (0.0, 0.0)
        sq = []
        for y in (y0[s], y1):
            d = at_kept(codec.dequantize(y.to(dtype), op.output) - y_fp[s], _rows(tokens, s))
            sq.append(float(d.square_().reshape(len(d), -1).sum(1).sum(dtype=torch.float64)))
        return y1, sq

    def add_errors(s: slice, sq) -> None:
        errors[0] += sq[0]
        errors[1] += sq[1]

    y1 = _stitch(parts, second_pass, take=add_errors)
    return delta, y0, y1, (errors[1] < errors[0]) if judge else None
