"""Collect calibration statistics over a captured graph in one streaming pass.

The min, max and histogram of every tensor (`calib.observers.Histogram`, whose bins coarsen as the
range grows), and for every conv/linear layer the second moment H = E[x xᵀ] and the mean E[x] of
its input patches, the quantities every weight method's output error is built on. Patches are subsampled per image at
seeded positions, so the cost and memory are bounded however large the feature maps are. In a text
encoder with an attention mask, the pass observes the kept tokens only (`calib.tokens`).

Every merge is exact: min/max, whole histogram counts on power-of-two bins, and the moments as
fixed-point sums (`calib.exactsum`), so the statistics are the same bits however the batches are
split over calibration ranks (`calib.distributed`), and the same bits as one process.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from collections.abc import Iterator
from typing import Callable

import numpy as np
import torch

from ..determinism import fixed_order, single_threaded_map
from ..ir import Graph, Op, execute
from ..ir.floatops import float_kernels
from ..memory import release_freed_memory
from .distributed import Shard
from .exactsum import FixedSum
from .packed import pack_upper, unpack_upper
from .preact import PreActSums, channel_sums
from .observers import Histogram, histogram_grid
from .progress import progress
from .shifted import cheaper_by_shifts, shifted_moments, tap_offsets, window_bases
from .sensitivity import fisher_mean, fisher_terms
from .sources import DataSource
from .tokens import at_kept, kept_tokens

MAX_POSITIONS = 256  # patches sampled per image and layer for H
GROUPED_POSITIONS = 256  # for a grouped conv's H (`layer_positions`)
PACK_MIN = 64  # narrower sums of x xᵀ are held whole (a depthwise layer's small blocks need not be symmetric)
_MEASURING_FISHER = threading.Lock()  # layers searched on several threads may ask for it at once


def rank_deficient(count: int, width: int) -> bool:
    """Whether an H of `width` inputs measured on `count` input vectors has rank at most a quarter of
    its width (a classifier after global pooling sees one per sample): held as a factor here, and
    searched with a ridge (`ptq.methods.errormodel.RANK_RIDGE`)."""
    return 0 < count and 4 * count <= width


class LayerInputStats:
    """Sums for E[x xᵀ] and E[x] of a layer's input patches, one block per conv group. The sum of
    x xᵀ of a layer's totals (`pack`) is held as its upper triangles where it is exactly symmetric
    and at least PACK_MIN wide (`calib.packed`: every dense layer's, half of what the statistics
    hold through the method stage)."""

    def __init__(self, xx: np.ndarray, x: np.ndarray, count: int = 0, pack: bool = False):
        self.x, self.count, self.k = x, count, xx.shape[-1]
        self._packed = pack_upper(xx) if pack and self.k >= PACK_MIN else None
        self._xx = xx if self._packed is None else None

    @property
    def xx(self) -> np.ndarray:
        """The sums of x xᵀ (G, K, K); a new array where they are held packed."""
        return self._xx if self._packed is None else unpack_upper(self._packed, self.k)

    @property
    def full_nbytes(self) -> int:
        """The bytes of the unpacked sums (what a layer's search holds while it runs)."""
        return self.x.shape[0] * self.k * self.k * self.x.itemsize  # x and its products share a dtype

    def merge(self, other: "LayerInputStats") -> "LayerInputStats":
        return LayerInputStats(self.xx + other.xx, self.x + other.x, self.count + other.count)

    @property
    def hessian(self) -> np.ndarray:
        xx = self.xx
        return np.divide(xx, max(self.count, 1), out=xx if self._packed is not None else None)

    @property
    def mean(self) -> np.ndarray:
        return self.x / max(self.count, 1)

    @cached_property
    def factor(self) -> np.ndarray | None:
        """F (G, r, K) with H = FᵀF from H's r leading eigenpairs, where the inputs seen bound its rank
        to r ≤ count ≤ K/4 (one input per sample to a classifier after pooling); None otherwise,
        where the full H is as cheap. Exact up to rounding: the other eigenvalues are zero."""
        k = self.k
        if not rank_deficient(self.count, k):
            return None
        with fixed_order():
            lam, u = torch.linalg.eigh(torch.from_numpy(self.hessian))  # ascending, per group
        r = self.count
        lam, u = lam[:, -r:].clamp_min(0.0).numpy(), u[:, :, -r:].numpy()
        return (u * np.sqrt(lam)[:, None, :]).transpose(0, 2, 1).copy()


@dataclass
class Statistics:
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    histograms: dict[str, Histogram] = field(default_factory=dict)
    layer_inputs: dict[str, LayerInputStats] = field(default_factory=dict)
    samples: int = 0
    measure_fisher: Callable[[], dict[str, np.ndarray]] | None = field(default=None, repr=False)
    # the first n calibration samples again, in batches of b (what the learned rounding optimises on)
    replay: Callable[[int, int], Iterator[torch.Tensor]] | None = field(default=None, repr=False)
    _fisher: dict[str, np.ndarray] | None = field(default=None, repr=False)
    # {conv or linear: (Σ of its FP32 pre-activation per output channel, values per channel)} over the
    # first `pre_act_rows` calibration samples (`calib.preact`)
    pre_act_sums: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict, repr=False)
    pre_act_rows: int = 0

    @property
    def fisher(self) -> dict[str, np.ndarray]:
        """Per-channel Fisher sensitivity (calib.sensitivity), measured on first use: only the
        allocator methods and multipoint's Fisher priority read it, so uniform recipes never pay
        for its backward pass. Empty when the recipe sets no sensitivity samples."""
        with _MEASURING_FISHER:
            if self._fisher is None:
                self._fisher = self.measure_fisher() if self.measure_fisher is not None else {}
                release_freed_memory()  # the backward pass's activations, before the method's searches
        return self._fisher


def layer_patches(op: Op, x: torch.Tensor, positions: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """Input patches of a conv/linear op as (G, rows, K); conv rows are sampled output positions.

    Ungrouped convolutions gather from the channels-last map with one indexing op (padding reads a
    zero pixel appended only when a sampled window crosses the border), so every gathered row is a
    contiguous run of channels. Grouped (depthwise) ones copy their windows out of a strided view of
    the padded map (`_grouped_patches`). Both are several times cheaper than indexing the map along
    its last axis, which was once the statistics stage's largest cost."""
    if op.kind == "linear":  # (N, ..., K): every leading position is one input row
        return x.reshape(1, -1, x.shape[-1])
    if op.attrs["groups"] > 1:
        return next(_grouped_patches(op, x, positions, gen))
    a = op.attrs
    kh, kw = op.weight.shape[2], op.weight.shape[3]
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    n, c, h, w = x.shape
    oh, ow = _out_size(op, h, w)
    pos = _sampled_positions(oh * ow, positions, gen)
    pos = torch.arange(oh * ow) if pos is None else pos
    oy, ox = pos // ow, pos % ow
    iy = (oy * sh - ph)[:, None, None] + (torch.arange(kh) * dh)[None, :, None]
    ix = (ox * sw - pw)[:, None, None] + (torch.arange(kw) * dw)[None, None, :]
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    idx = torch.where(inside, iy * w + ix, h * w).reshape(-1)
    flat = x.permute(0, 2, 3, 1).reshape(n, h * w, c)
    if not bool(inside.all()):
        flat = torch.cat([flat, flat.new_zeros(n, 1, c)], 1)
    patches = flat.index_select(1, idx).reshape(n * pos.numel(), kh, kw, c).permute(0, 3, 1, 2)
    return patches.reshape(1, n * pos.numel(), c * kh * kw)


def skip_patch_positions(op: Op, shape: torch.Size, positions: int | None, gen: torch.Generator) -> None:
    """Advance `gen` past the one draw `layer_patches(op, x, positions, gen)` makes for an input x of
    `shape` (a conv's sampled output positions; none for a linear op), so that mini-batches can take
    their patches out of order from the states one pass in order would have."""
    if op.kind == "conv":
        oh, ow = _out_size(op, shape[2], shape[3])
        _sampled_positions(oh * ow, positions, gen)


def _out_size(op: Op, h: int, w: int) -> tuple[int, int]:
    """A conv op's output height and width on an h×w input."""
    a = op.attrs
    kh, kw = op.weight.shape[2], op.weight.shape[3]
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def layer_positions(op: Op, positions: int, grouped_positions: int) -> int:
    """Output positions sampled per image for op's H: `grouped_positions` for a grouped conv, whose
    H per group is only its kernel's taps wide (9 for a 3×3 depthwise conv), `positions` otherwise.
    Copying a depthwise conv's patches is half of Lite0's statistics pass; 64 positions made the pass
    a quarter faster, but moved `bitplane-4.5`'s held-out KL from 0.053/0.078 to 0.092/0.092 on two
    draws (1024: 0.079/0.097), so both stay at 256 (BENCHMARKS.md, session 31)."""
    return grouped_positions if op.kind == "conv" and op.attrs["groups"] > 1 else positions


def _sampled_positions(total: int, positions: int | None, gen: torch.Generator | None) -> torch.Tensor | None:
    """`positions` of a conv's `total` output positions drawn from `gen`; None: all of them, in order."""
    return torch.randperm(total, generator=gen)[:positions] if positions is not None and total > positions else None


def _grouped_patches(op: Op, x: torch.Tensor, positions: int | None, gen: torch.Generator | None,
                     part_elements: int | None = None) -> Iterator[torch.Tensor]:
    """A grouped conv's patches (`layer_patches`): all groups at once, or in parts of about
    `part_elements` elements, a whole multiple of 8 groups each (measured to give the bits of one
    bmm call; other part sizes did not). Each part's windows are copied out of a strided view of the
    padded map, keeping each group's rows together."""
    a = op.attrs
    kh, kw = op.weight.shape[2], op.weight.shape[3]
    (sh, sw), (ph, pw), (dh, dw), g = a["stride"], a["padding"], a["dilation"], a["groups"]
    n, c, h, w = x.shape
    oh, ow = _out_size(op, h, w)
    pos = _sampled_positions(oh * ow, positions, gen)
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
    s_n, s_c, s_y, s_x = xp.stride()
    cg = c // g
    windows = xp.as_strided((g, n, oh, ow, cg, kh, kw), (cg * s_c, s_n, sh * s_y, sw * s_x, s_c, dh * s_y, dw * s_x))
    rows = n * (oh * ow if pos is None else pos.numel())
    k = cg * kh * kw
    per_part = g if part_elements is None else max(8, part_elements // (rows * k) // 8 * 8)
    for start in range(0, g, per_part):
        part = windows[start:start + per_part]
        if pos is not None:
            part = part[:, :, pos // ow, pos % ow]
        yield part.reshape(part.shape[0], rows, k)


def moments_of(p: torch.Tensor) -> LayerInputStats:
    """The sums of x xᵀ and x over patches p (G, rows, K)."""
    return LayerInputStats(torch.bmm(p.transpose(1, 2), p).double().numpy(), p.sum(1).double().numpy(), p.shape[1])


PART_ELEMENTS = 1 << 19  # a grouped conv's patches are copied and multiplied this many elements at a time


def patch_moments(op: Op, x: torch.Tensor, positions: int | None, gen: torch.Generator | None) -> LayerInputStats:
    """The sums of x xᵀ and x over a batch's input patches of a conv/linear layer (`layer_patches`).

    A depthwise conv's come from shifted products of its map where that is cheaper than copying its
    patches (`calib.shifted`: most of Lite0's statistics pass otherwise). A grouped conv's otherwise
    are taken a few groups at a time (2 MB of patches): the same bits as all at once, and twice as
    fast on a depthwise layer whose patches outgrow the cache."""
    if op.kind != "conv" or op.attrs["groups"] == 1:
        return moments_of(layer_patches(op, x, positions, gen))
    if op.weight.shape[1] == 1:
        a = op.attrs
        (ph, pw), (kh, kw) = a["padding"], op.weight.shape[2:]
        oh, ow = _out_size(op, x.shape[2], x.shape[3])
        hp, wp = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        if cheaper_by_shifts(kh, kw, hp, wp, oh * ow if positions is None else min(positions, oh * ow)):
            pos = _sampled_positions(oh * ow, positions, gen)
            xp = torch.nn.functional.pad(x, (pw, pw, ph, ph)) if ph or pw else x.contiguous()
            bases = window_bases(oh, ow, a["stride"], wp, pos)
            xx, xs = shifted_moments(xp, tap_offsets(kh, kw, a["dilation"]), bases)
            return LayerInputStats(xx.double().numpy(), xs.double().numpy(), x.shape[0] * bases.numel())
    parts = [moments_of(p) for p in _grouped_patches(op, x, positions, gen, PART_ELEMENTS)]
    return LayerInputStats(np.concatenate([m.xx for m in parts]), np.concatenate([m.x for m in parts]), parts[0].count)


def collect_statistics(graph: Graph, source: DataSource, batch_size: int = 16, seed: int = 0,
                       positions: int = MAX_POSITIONS, sensitivity_samples: int = 0,
                       shard: Shard | None = None, fisher_now: bool = False,
                       grouped_positions: int = GROUPED_POSITIONS, moments: bool = True,
                       pre_act_rows: int = 0, coherent: bool = False) -> Statistics:
    """One pass over `source`: ranges, histograms and per-layer input moments (unless not
    `moments`: a recipe that reads none skips most of the pass's work); each conv's and linear's
    FP32 pre-activation summed per output channel over the first `pre_act_rows` samples
    (`calib.preact`: bias correction's reference, `Statistics.pre_act_sums`); the
    per-channel Fisher sensitivity on the first `sensitivity_samples` samples (0: none; `coherent`:
    measured with a probe, `calib.sensitivity`) is measured when a method first asks for it, by this
    process alone.

    With a `shard` of several ranks (`calib.distributed`), this rank streams only its batches and
    every rank ends with the same totals, the bits one process gets; `fisher_now` measures the
    Fisher sensitivity now, split over the ranks (for a method that reads it)."""
    shard = shard or Shard()
    stats = Statistics(samples=len(source))
    kernels = float_kernels(torch.float32)
    mine = shard.part(-(-len(source) // batch_size))
    names = [graph.input] + [op.output for op in graph.ops]
    tokens = kept_tokens(graph)
    scores = {op.inputs[0] for op in graph.ops if op.kind == "softmax" and len(op.inputs) == 2}
    stats.histograms = {t: Histogram.empty() for t in names}
    weighted = [op for op in graph.ops if op.weight is not None] if moments else []
    npos = {op.name: layer_positions(op, positions, grouped_positions) for op in weighted}
    sums = {op.name: MomentSums(graph, op, len(source), npos[op.name]) for op in weighted}
    pre_act_rows = min(pre_act_rows, len(source))
    pre_acts = PreActSums({op.name: op.weight.shape[0] for op in graph.weighted_ops()}, pre_act_rows, batch_size)
    gen = torch.Generator().manual_seed(seed)
    skip_positions(graph, npos, gen, mine.start)

    def seeded(batches: Iterator[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Each batch with the patch positions' generator state it starts from, as one process draws
        them, and its rows among the first `pre_act_rows` samples."""
        for b, xb in zip(mine, batches):
            state = gen.get_state()
            skip_positions(graph, npos, gen, 1)
            yield xb, state, min(max(pre_act_rows - b * batch_size, 0), xb.shape[0])

    merging = threading.Lock()

    def observe(item: tuple[torch.Tensor, torch.Tensor, int]) -> None:
        """Merge one batch's histogram of every tensor, input moments of every layer and pre-activation
        sums of its first `rows` samples, each as soon as it is computed (exact merges: the same totals
        in any order)."""
        xb, state, rows = item
        g = torch.Generator().set_state(state)
        peaks: dict[str, float] = {}  # this batch's largest magnitude of each tensor its histogram saw

        def merge(name: str, x: torch.Tensor) -> None:
            h = Histogram.of(x)
            if not (np.isfinite(h.lo) and np.isfinite(h.hi)) and x.numel():
                from ptq.errors import DataError
                raise DataError(f"tensor {name} became NaN/Inf on calibration data; check the data and the weights")
            peaks[name] = max(abs(h.lo), abs(h.hi)) if x.numel() else 0.0
            with merging:
                stats.histograms[name] = stats.histograms[name].merge(h)

        def on_output(op: Op, xs: list[torch.Tensor], y: torch.Tensor):
            merge(op.output, at_kept(y, keep, op.output in scores))
            if op.name in sums:
                x = at_kept(xs[0], keep)
                m = patch_moments(op, x, npos[op.name], g)
                # the input's histogram saw x or more of it, except attention scores (kept keys only)
                peak = peaks[op.inputs[0]] if op.inputs[0] not in scores else float(x.abs().max())
                with merging:
                    sums[op.name].add(m, peak)

        def on_pre_act(op: Op, pre: torch.Tensor) -> None:
            sums = channel_sums(pre[:rows], None if keep is None else keep[:rows])
            with merging:
                pre_acts.add(op.name, sums)

        with torch.no_grad():
            keep = tokens(xb) if tokens else None
            merge(graph.input, xb)
            execute(graph, xb, float_kernels(torch.float32, on_pre_act) if rows else kernels, on_output=on_output)

    with shard.agreed(), progress("calibration pass (ranges, histograms, layer inputs)", len(mine)) as advance:
        for _ in single_threaded_map(observe, seeded(source.batches(batch_size, mine))):
            advance()
    stats.histograms = merged_histograms(stats.histograms, shard)
    stats.ranges = {t: (h.lo, h.hi) for t, h in stats.histograms.items()}
    stats.layer_inputs = MomentSums.merged(sums, shard) if sums else {}
    if pre_act_rows:
        stats.pre_act_sums, stats.pre_act_rows = pre_acts.merged(shard), pre_act_rows
    stats.replay = lambda n, b: _head(source.batches(b), min(n, len(source)))
    if sensitivity_samples > 0:
        n = min(sensitivity_samples, len(source))

        def measure(part: Shard) -> dict[str, np.ndarray]:
            batches = part.part(-(-n // batch_size))
            with progress("sensitivity (one backward pass)", len(batches)) as advance:
                terms = []
                with part.agreed():
                    heads = (xb[:n - b * batch_size] for b, xb in zip(batches, source.batches(batch_size, batches)))
                    for term in fisher_terms(graph, heads, seed, batches.start, batch_size, coherent):
                        terms.append(term)
                        advance()
                return fisher_mean(part.gather(terms))
        stats.measure_fisher = lambda: measure(Shard())
        if fisher_now:
            stats._fisher = measure(shard)
    return stats


def merged_histograms(histograms: dict[str, Histogram], shard: Shard) -> dict[str, Histogram]:
    """Every tensor's histogram over all ranks: the ranks agree on each tensor's min and max, coarsen
    their counts to that range's grid, and add them (whole counts in float64: exact in any order)."""
    lo = np.array([h.lo for h in histograms.values()])
    hi = np.array([h.hi for h in histograms.values()])
    shard.minimum(lo)
    shard.maximum(hi)
    grids = [histogram_grid(a, b) if a <= b else None for a, b in zip(lo, hi)]
    counts = np.concatenate([h.regridded(*grid) if grid else np.zeros(0) for h, grid in zip(histograms.values(), grids)])
    shard.add(counts)
    out, at = {}, 0
    for (name, h), a, b, grid in zip(histograms.items(), lo, hi, grids):
        if grid is None:
            out[name] = Histogram.empty()
            continue
        exp, start, n = grid
        out[name] = Histogram(float(a), float(b), exp, start, counts[at:at + n])
        at += n
    return out


class MomentSums:
    """A layer's sums of x xᵀ and x over its input patches as fixed-point sums (`calib.exactsum`):
    a batch's are bounded by the patch rows the whole calibration set gives times the batch's own
    peak input, so that ranks and batches add up to the same bits in any grouping, in one pass."""

    def __init__(self, graph: Graph, op: Op, samples: int, positions: int):
        self.rows = samples * _rows_per_sample(graph, op, positions)
        groups = op.attrs["groups"] if op.kind == "conv" else 1
        k = op.weight_matrix_shape[1]
        self.xx = FixedSum((groups, k, k))
        self.x = FixedSum((groups, k))
        self.count = 0

    def add(self, m: LayerInputStats, peak: float) -> None:
        """A batch's sums, whose inputs are at most `peak` in magnitude."""
        # 2×: a float32 sum of products may round above the exact bound it approximates
        self.xx.add(m.xx, 2.0 * self.rows * peak * peak)
        self.x.add(m.x, 2.0 * self.rows * peak)
        self.count += m.count

    @staticmethod
    def merged(sums: dict[str, "MomentSums"], shard: Shard) -> dict[str, LayerInputStats]:
        """Every layer's totals over all ranks, as float64 LayerInputStats: the ranks agree on which
        unit exponents any of them used, then add each exponent's integers."""
        counts = np.array([s.count for s in sums.values()], np.int64)
        shard.add(counts)
        used: dict[tuple[str, str], set[int]] = {}
        for name, part, exps in shard.gather([(name, part, sorted(getattr(s, part).units))
                                              for name, s in sums.items() for part in ("xx", "x")]):
            used.setdefault((name, part), set()).update(exps)
        out = {}
        for (name, s), count in zip(sums.items(), counts):
            if count > s.rows:
                raise RuntimeError(f"layer {name} gave {count} patch rows, more than the {s.rows} its sums were bounded for")
            for part in ("xx", "x"):
                total = getattr(s, part)
                for e in sorted(used[(name, part)]):
                    shard.add(total.units.setdefault(e, np.zeros(total.shape, np.int64)))
            out[name] = LayerInputStats(s.xx.value(), s.x.value(), int(count), pack=True)
            s.xx = s.x = None  # free the integers layer by layer
        return out


def _rows_per_sample(graph: Graph, op: Op, positions: int) -> int:
    """Patch rows one sample gives `layer_patches`: the sampled output positions of a conv, every
    leading position of a linear input."""
    if op.kind == "conv":
        _, oh, ow = op.attrs["out_shape"]
        return min(positions, oh * ow)
    producer = graph.producers().get(op.inputs[0])
    shape = graph.input_shape if producer is None else producer.attrs["out_shape"]
    return int(np.prod(shape[:-1], dtype=np.int64))


def skip_positions(graph: Graph, positions: dict[str, int], gen: torch.Generator, batches: int) -> None:
    """Advance `gen` past what `batches` batches of the pass draw (one `layer_patches` randperm per
    conv in `positions` with more output positions than its own count there), so a rank starting at
    a later batch samples the positions one process samples there."""
    totals = {op.name: op.attrs["out_shape"][1] * op.attrs["out_shape"][2] for op in graph.ops
              if op.name in positions and op.kind == "conv"}
    for _ in range(batches):
        for name, total in totals.items():
            _sampled_positions(total, positions[name], gen)  # the draw `layer_patches` makes, or none


def _head(batches, n: int):
    """The first n samples of a batch stream."""
    got = 0
    for xb in batches:
        if got >= n:
            return
        yield xb[:n - got]
        got += xb.shape[0]
