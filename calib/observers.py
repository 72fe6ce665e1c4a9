"""Streaming, mergeable activation statistics and the encodings chosen from them.

One streaming pass keeps each tensor's min/max and a histogram whose power-of-two bins coarsen as
its range grows; both merge exactly, so calibration can be split over batches or processes in
bounded memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from ..errors import RecipeError
from ..ir import Graph

HIST_BINS = 4096  # at most this many bins per tensor (`Histogram`): never coarser than 2048 equal bins
HIST_SAMPLE = 1 << 20  # values per batch and tensor that enter the histogram (strided subsample)
OBSERVERS = ("minmax", "percentile", "mse")
# LayerNorm inputs (residual sums, whose outlier channels an 8-bit grid crushes), the addends of those
# sums that no GEMM reads (`residual_addends`) and softmax inputs (attention scores) are encoded at no
# fewer than WIDE_BITS: none feeds a GEMM, so the width costs only memory traffic.
WIDE_INPUT_KINDS = ("layernorm", "softmax")
WIDE_BITS = 16
# In a graph with LayerNorm (an encoder), the GEMM inputs a LayerNorm or a lookup table (GELU) produces
# are encoded at no fewer than the recipe's `encoder.gemm_input_bits` (`encoder_gemm_inputs`): at 8 bits
# they carried most of all-MiniLM-L6-v2's error (BENCHMARKS.md, Transformers).
# An embedding's input has the identity encoding (16 bits, scale 1, zero point 0): its codes are the
# token ids, and those of the tensors sharing it (an attention mask packed beside them) their values.


@dataclass(frozen=True)
class Encoding:
    """Affine activation encoding: real ≈ scale·(q − zero_point), q in [0, 2^bits − 1]."""

    bits: int
    scale: float
    zero_point: int

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def to_dict(self) -> dict:
        return {"bits": self.bits, "signed": False, "scale": self.scale, "zero_point": self.zero_point}

    @staticmethod
    def from_range(lo: float, hi: float, bits: int) -> "Encoding":
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        if hi - lo < 1e-12:
            hi = lo + 1e-6
        qmax = (1 << bits) - 1
        scale = (hi - lo) / qmax
        z = int(np.clip(np.floor(-lo / scale + 0.5), 0, qmax))
        return Encoding(bits, float(scale), z)


@dataclass
class Histogram:
    """A tensor's exact min and max, and counts of its values in bins [i·2^exp, (i+1)·2^exp) for
    i = start, …, start + len(counts) − 1.

    The bin width is the narrowest power of two at which [lo, hi] spans at most HIST_BINS bins
    (`histogram_grid`), so it follows from lo and hi alone. Halving the resolution adds pairs of bins exactly,
    so two histograms merge by coarsening both to the grid of their union: one streaming pass needs
    no range in advance, and any order or grouping of batches (threads, ranks) gives the same counts,
    those of the whole data's grid. The bins are 1 to 2 times as wide as HIST_BINS equal bins over
    [lo, hi] would be."""

    lo: float
    hi: float
    exp: int = 0
    start: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @staticmethod
    def empty() -> "Histogram":
        """The histogram of no values (its range is empty until a value arrives)."""
        return Histogram(np.inf, -np.inf)

    @staticmethod
    def of(x: torch.Tensor) -> "Histogram":
        """x's histogram: its min and max over every value, counts of a strided sample of at most
        HIST_SAMPLE values (whole numbers in float64: any order of adding them gives the same bits)."""
        flat = x.detach().float().flatten()
        if flat.numel() == 0:
            return Histogram.empty()
        a, b = (float(v) for v in torch.aminmax(flat))
        if not (np.isfinite(a) and np.isfinite(b)):
            return Histogram(a, b)  # no counts: the caller names the tensor in its error
        exp, start, n = histogram_grid(a, b)
        if flat.numel() > HIST_SAMPLE:
            flat = flat[:: (flat.numel() + HIST_SAMPLE - 1) // HIST_SAMPLE]
        scale = 2.0 ** -exp
        scaled = (flat if scale < 2.0 ** 100 else flat.double()) * scale  # a power of two: exact, |·| < 2^41
        idx = scaled.floor_().long() - start
        return Histogram(a, b, exp, start, torch.bincount(idx, minlength=n).double().numpy())

    def merge(self, other: "Histogram") -> "Histogram":
        """The histogram of both histograms' values, on the grid of their union."""
        lo, hi = min(self.lo, other.lo), max(self.hi, other.hi)
        if not lo <= hi:
            return Histogram.empty()
        exp, start, n = histogram_grid(lo, hi)
        return Histogram(lo, hi, exp, start, self.regridded(exp, start, n) + other.regridded(exp, start, n))

    def regridded(self, exp: int, start: int, n: int) -> np.ndarray:
        """The counts on the coarser (or same) grid of n bins of 2^exp from index `start`."""
        if self.counts.size == 0:
            return np.zeros(n)
        shift = min(exp - self.exp, 62)  # |index| < 2^42 (`histogram_grid`): a larger shift gives the same bins
        assert shift >= 0, "a histogram only coarsens"
        idx = (np.arange(self.start, self.start + self.counts.size, dtype=np.int64) >> shift) - start
        return np.bincount(idx, weights=self.counts, minlength=n)

    def centers(self) -> np.ndarray:
        return (self.start + np.arange(self.counts.size) + 0.5) * 2.0 ** self.exp


MIN_EXP = -200  # the bin exponent of a tensor of zeros: below that of any nonzero float32 range


def histogram_grid(lo: float, hi: float) -> tuple[int, int, int]:
    """(exp, start, n) of [lo, hi]'s bins: the smallest exp at which floor(hi/2^exp) − floor(lo/2^exp)
    < HIST_BINS, and no finer than 2^-40 of the largest magnitude (so a constant tensor gets one bin
    and every index fits float64 and int64 exactly). Nondecreasing as [lo, hi] grows, which is what
    lets histograms merge exactly."""
    peak = max(abs(lo), abs(hi))
    exp = MIN_EXP if peak == 0 else math.frexp(peak)[1] - 40
    span = hi - lo
    if span > 0:
        exp = max(exp, math.frexp(span / HIST_BINS)[1] - 1)
    while math.floor(hi * 2.0 ** -exp) - math.floor(lo * 2.0 ** -exp) >= HIST_BINS:
        exp += 1
    start = math.floor(lo * 2.0 ** -exp)
    return exp, start, math.floor(hi * 2.0 ** -exp) - start + 1


def _quant_error(values: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    """Histogram-weighted squared error of affine quantization for each candidate range (vectorised)."""
    qmax = (1 << bits) - 1
    scale = (hi - lo) / qmax
    z = np.clip(np.floor(-lo / scale + 0.5), 0, qmax)
    q = np.clip(np.floor(values[None, :] / scale[:, None] + 0.5) + z[:, None], 0, qmax)
    deq = (q - z[:, None]) * scale[:, None]
    return ((values[None, :] - deq) ** 2 * counts[None, :]).sum(axis=1)


def choose_encoding(hist: Histogram, bits: int, observer: str = "mse", percentile: float = 99.99,
                    act: list | None = None) -> Encoding:
    """Pick an encoding for a tensor from its histogram; `act` is a fused clamp known to bound it."""
    lo, hi = hist.lo, hist.hi
    if act is not None:
        if act[0] is not None:
            lo = max(lo, act[0])
        if act[1] is not None:
            hi = min(hi, act[1])
    if observer == "minmax" or hist.counts.sum() == 0:
        return Encoding.from_range(lo, hi, bits)
    values, counts = hist.centers(), hist.counts
    if observer == "percentile":
        cdf = np.cumsum(counts) / counts.sum()
        q = percentile / 100.0
        p_lo = values[min(np.searchsorted(cdf, 1 - q), values.size - 1)]
        p_hi = values[min(np.searchsorted(cdf, q), values.size - 1)]
        return Encoding.from_range(max(lo, p_lo) if lo < 0 else lo, min(hi, p_hi), bits)
    if observer != "mse":
        raise ValueError(f"unknown observer {observer!r}")
    fractions = np.linspace(0.05, 1.0, 96)
    if lo >= 0:
        cand_lo, cand_hi = np.zeros_like(fractions), hi * fractions
    elif hi <= 0:
        cand_lo, cand_hi = lo * fractions, np.zeros_like(fractions)
    else:
        grid = np.linspace(0.1, 1.0, 40)
        a, b = np.meshgrid(grid, grid, indexing="ij")
        cand_lo, cand_hi = lo * a.ravel(), hi * b.ravel()
    keep = counts > 0
    err = _quant_error(values[keep], counts[keep], cand_lo, cand_hi, bits)
    best = int(np.argmin(err))
    return Encoding.from_range(cand_lo[best], cand_hi[best], bits)


def residual_addends(graph: Graph, src: Mapping[str, str]) -> set[str]:
    """The inputs of a residual add that feeds a LayerNorm (an encoder's attention and FFN outputs,
    whose few outlier channels would take an 8-bit grid's whole range), unless a GEMM also reads them.
    Empty for a graph without LayerNorm, so CNN encodings are untouched."""
    norms = {src[op.inputs[0]] for op in graph.ops if op.kind == "layernorm"}
    gemm_inputs = {src[op.inputs[0]] for op in graph.weighted_ops()} | \
        {src[t] for op in graph.ops if op.kind == "matmul" for t in op.inputs}
    return {src[t] for op in graph.ops if op.kind == "add" and src[op.output] in norms
            for t in op.inputs if src[t] not in gemm_inputs}


def is_encoder(graph: Graph) -> bool:
    """A graph with a LayerNorm: the [encoder] recipe settings apply to it."""
    return any(op.kind == "layernorm" for op in graph.ops)


def encoder_gemm_inputs(graph: Graph, src: Mapping[str, str]) -> set[str]:
    """In a graph with LayerNorm, the outputs of LayerNorms and lookup tables (an encoder's normalised
    hidden states and its GELU) that a GEMM reads and no lookup table does (a table needs ≤ 8-bit
    inputs). Empty for other graphs, so a CNN's hardswish outputs are untouched."""
    if not is_encoder(graph):
        return set()
    made = {src[op.output] for op in graph.ops if op.kind in ("layernorm", "lut")}
    gemm_inputs = {src[op.inputs[0]] for op in graph.weighted_ops()} | \
        {src[t] for op in graph.ops if op.kind == "matmul" for t in op.inputs}
    tables = {src[op.inputs[0]] for op in graph.ops if op.kind == "lut"}
    return (made & gemm_inputs) - tables


def choose_encodings(graph: Graph, histograms: Mapping[str, Histogram], recipe: Mapping[str, Any],
                     weights: Mapping[str, Any] | None = None) -> dict[str, Encoding]:
    """Every tensor's encoding by the recipe's [activations] (and, in an encoder, [encoder]): each
    encoding source gets its own (the output at `output_bits`, a layer's input at the width a method
    chose for it in `weights[name].input_bits`), a pass-through tensor shares its source's. Shared by
    the manifest builder and the learned rounding's fake-quant model, so both quantize the same
    tensors alike."""
    act = recipe["activations"]
    src = graph.encoding_source()
    producers = graph.producers()
    output_sources = {src[o] for o in graph.outputs}
    widths = {src[op.inputs[0]]: weights[op.name].input_bits for op in graph.weighted_ops()
              if weights is not None and weights[op.name].input_bits is not None}
    wide = {src[op.inputs[0]] for op in graph.ops if op.kind in WIDE_INPUT_KINDS}
    wide |= residual_addends(graph, src)
    gemm = encoder_gemm_inputs(graph, src)
    ids = {src[op.inputs[0]] for op in graph.ops if op.kind == "embedding"}
    own: dict[str, Encoding] = {}
    for t in sorted(set(src.values())):
        bits = widths.get(t, act["output_bits"] if t in output_sources else act["bits"])
        if t in wide:
            bits = max(bits, WIDE_BITS)
        if t in gemm and t not in widths:
            bits = max(bits, recipe["encoder"]["gemm_input_bits"])
        fused = producers[t].attrs.get("act") if t in producers else None
        own[t] = Encoding(16, 1.0, 0) if t in ids else \
            choose_encoding(histograms[t], bits, act["observer"], act["percentile"], fused)
    for op in graph.ops:
        if op.kind == "lut" and own[src[op.inputs[0]]].bits > 8:
            raise RecipeError(f"op {op.name} ({op.attrs['function']}) runs as a lookup table and needs inputs of at most 8 bits; set activations.bits <= 8")
    return {t: own[s] for t, s in src.items()}
