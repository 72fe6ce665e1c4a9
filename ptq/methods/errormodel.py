"""Per-channel symmetric weight quantization and the output-error model every method minimises.

A channel's output error for an approximation ŵ is (w − ŵ)ᵀ H (w − ŵ), with H = E[x xᵀ] of the
layer's input patches (one H per conv group). Clipping by this error instead of weight MSE is what
keeps low-bit layers usable (docs/ALGORITHMS.md, uniform).

These sums decide clip ratios, SWIS sets, refitted scales and the allocator's choices, and some
are written into the manifest; they run under `fixed_order` so that they are the same bytes at any
thread count.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cached_property

import numpy as np
import torch

from ..calib.collect import rank_deficient
from ..determinism import fixed_order
from ..intmath import qmax


def _grid_codes(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """floor(w / scale + 1/2) (`intmath.round_half_up`) clipped to the narrow grid, as whole float64
    numbers in one buffer."""
    m = qmax(bits)
    x = np.asarray(w / scale[..., None], np.float64)  # a fresh array: the rest works in it
    x += 0.5
    np.floor(x, out=x)
    return np.clip(x, -m, m, out=x)


def quantize_symmetric(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Round (C, K) weights to the narrow grid with per-channel scales (C,), or with candidate scales
    (..., C) in one batch (..., C, K); int64 result."""
    return _grid_codes(w, scale, bits).astype(np.int64)


def clip_residuals(w: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """w − s·q(s) for a batch of candidate scales (t, C) of w (C, K), as float32 (t, C, K): the bits of
    `quantize_symmetric` and the float64 difference (whole numbers times s are exact either way),
    computed in one buffer. A clip search forms 40 of these per width; with the temporaries of
    the integer round trip that took two fifths of its time."""
    x = _grid_codes(w, scales, bits)
    x *= scales[..., None]
    out = np.empty(x.shape, np.float32)
    np.subtract(w[None], x, out=out, casting="same_kind")  # in float64, rounded to float32 once
    return out


DENSE_BLOCK = 1 << 22  # entries of H converted to float64 at a time for a dense product (32 MB)
SCREEN_RANK = 16  # leading directions of H that `ErrorModel.screen` keeps exactly
UNSEEN_WEIGHT = 1e-9  # a group never seen on calibration data: its weight error's share of the seen energy
# A search within a layer (its clip ratios; error feedback's integers) on an H measured on fewer inputs
# than a quarter of its width (a classifier after global pooling: one input per calibration sample)
# uses H + RANK_RIDGE·mean(diag H)·I. The sampled H is zero on most directions, and a search fits
# them: on Lite0's 1280-wide classifier at 4 bits the clip by the raw H cut the calibration KL 3-fold
# and raised the held-out KL above no clipping at all; with the ridge its held-out KL halved on each
# of three draws, the calibration KL the same (BENCHMARKS.md, session 43). The allocators compare
# layers on the raw H: its error is what the calibration data measured. A recipe's `weights.ridge`
# extends the ridge to every layer in proportion to its inputs per calibration sample: on three Lite0
# draws `bitplane-4.5`'s held-out KL fell 9-14% with 0.03 (BENCHMARKS.md, session 44).
RANK_RIDGE = 1.0


def ridge_level(width: int, count: int, ridge: float = 0.0, samples: int = 0) -> float:
    """ρ / mean(diag H) for a search within a layer of `width` inputs whose H was measured on `count`
    input vectors from `samples` calibration samples: RANK_RIDGE where the count is at most a quarter
    of the width (`calib.collect.rank_deficient`), and at least `ridge`·width/samples (the recipe's
    `weights.ridge`: a late layer's H comes from many patches of few photos, and a search fits what
    those photos show; module note); 0 for none."""
    level = RANK_RIDGE if rank_deficient(count, width) else 0.0
    return max(level, ridge * width / samples) if ridge > 0 and samples > 0 else level


def search_ridge(hessian: np.ndarray, level: float) -> np.ndarray:
    """ρ = level·mean(diag H) per group of H (G, K, K): what a search adds (`ridge_level`)."""
    return level * np.einsum("gkk->g", hessian, dtype=np.float64) / hessian.shape[-1]


def unseen_groups(hessian: np.ndarray) -> np.ndarray:
    """(G,) whether each conv group's inputs were zero on every calibration sample (H's trace is 0):
    its output error cannot tell candidates apart, so methods weigh its weights alike instead."""
    return np.einsum("gkk->g", hessian, dtype=np.float64) <= 0


class ErrorModel:
    """Evaluates (w − ŵ)ᵀ H (w − ŵ) per output channel for one layer, batched over candidates.

    Where H is known to have rank r well below K (a classifier after global pooling sees one input
    per calibration sample: r ≤ N), it is used as H = FᵀF + ρI with F the (r, K) factor of its leading
    eigenvectors: a product costs r/K of the full one, what makes a 1280-wide classifier cheap. ρ is
    0; `search_ridge` (G,), where given, is what the model a search uses adds (`for_search`)."""

    def __init__(self, hessian: np.ndarray | None, channels: int, factor: np.ndarray | None = None,
                 search_ridge: np.ndarray | None = None):
        self.groups = 1 if hessian is None else hessian.shape[0]
        self.f = None if factor is None else torch.from_numpy(factor).float()  # (G, r, K), H = FᵀF + ρI
        self.h = None if hessian is None or factor is not None else torch.from_numpy(hessian).float()  # (G, K, K)
        self._ridge_for_search = search_ridge  # ρ a search adds (`for_search`)
        self._searched: ErrorModel | None = None  # `for_search`'s model, once built
        self.ridge: torch.Tensor | None = None  # ρ (G,) in the factor form where a search adds it
        self.channels = channels
        self.known = hessian is not None
        if self.known:
            self._weigh_unseen_groups(hessian)

    @classmethod
    def of(cls, li, channels: int, ridge: float = 0.0, samples: int = 0) -> "ErrorModel":
        """The model of a layer's input statistics (`calib.collect.LayerInputStats`): its H, as a
        factor where that is exact and cheaper, with the ridge its searches add (`ridge_level`;
        `ridge`: the recipe's `weights.ridge`, over `samples` calibration samples)."""
        h = li.hessian
        level = ridge_level(h.shape[-1], li.count, ridge, samples)
        return cls(h, channels, li.factor, search_ridge(h, level) if level > 0 else None)

    def for_search(self) -> "ErrorModel":
        """The model a search within the layer uses: H + ρI where the layer has a search ridge
        (`ridge_level`; the module's note), else this one."""
        if self._ridge_for_search is None:
            return self
        if self._searched is None:  # built once: a full H's ridged copy is the size of H
            out = copy.copy(self)
            out.__dict__.pop("_screen", None)  # computed on the H without the ridge
            out._ridge_for_search = None  # the searched model is its own
            rho = torch.from_numpy(self._ridge_for_search).float()
            if self.f is not None:
                out.ridge = rho
            else:
                out.h = self.h + rho[:, None, None] * torch.eye(self.h.shape[-1])
            self._searched = out
        return self._searched

    def _ridged(self, hd: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """hd + ρ·d per group (G, ·, ·): H·d in the factor form, with the ridge of a search."""
        return hd if self.ridge is None else hd + self.ridge.to(d.dtype)[:, None, None] * d

    def _weigh_unseen_groups(self, hessian: np.ndarray) -> None:
        """A conv group whose inputs were zero on every calibration sample (a depthwise channel after
        a ReLU that these photos never open) has H = 0: every candidate's output error is 0, and a
        search would keep the first one, its heaviest clipping, for a channel that other data does
        open. Such a group is measured by weight error instead, UNSEEN_WEIGHT of the seen groups'
        mean input energy per input (1 where none was seen), so its choices are the weight-MSE
        ones while the sums over a layer's channels stay what the seen groups make them."""
        unseen = unseen_groups(hessian)
        if not unseen.any():
            return
        k = hessian.shape[-1]
        seen = hessian[~unseen]
        level = UNSEEN_WEIGHT * float(np.einsum("gkk->g", seen, dtype=np.float64).mean()) / k if len(seen) else 1.0
        h = torch.from_numpy(np.array(hessian, np.float32))  # a copy: the statistics stay as measured
        h[torch.from_numpy(unseen)] = level * torch.eye(k)
        self.f, self.h = None, h  # a search's ρ for an unseen group is 0, as its H's trace is

    def _grouped(self, d: torch.Tensor) -> torch.Tensor:
        """(..., C, K) → (G, rows, K), each group's channels with every leading index."""
        k, g = d.shape[-1], self.groups
        return d.reshape(-1, g, self.channels // g, k).permute(1, 0, 2, 3).reshape(g, -1, k)

    def _ungrouped(self, t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        g = self.groups
        return t.reshape(g, -1, self.channels // g, t.shape[-1]).permute(1, 0, 2, 3).reshape(*lead, self.channels, t.shape[-1])

    def hmul(self, a: np.ndarray | torch.Tensor, dtype: type = np.float32) -> torch.Tensor:
        """H a for every channel of (..., C, K) (a itself when no H is known), in `dtype` (an array
        is converted; a tensor is taken as it is)."""
        d = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a, dtype))
        if not self.known:
            return d
        return self._ungrouped(self.rows_times_h(self._grouped(d)), d.shape[:-2])

    def rows_times_h(self, dg: torch.Tensor) -> torch.Tensor:
        """H d for each row of (G, n, K), in the rows' dtype: float32 in one product, float64 with H's
        columns converted a block at a time (no float64 copy of a large H)."""
        with fixed_order():
            if self.f is not None:
                f = self.f.to(dg.dtype)
                return self._ridged(torch.bmm(torch.bmm(dg, f.transpose(1, 2)), f), dg)
            if dg.dtype == self.h.dtype:
                return torch.bmm(dg, self.h)  # H is symmetric: rows of dg·H are H·d
            hd = torch.empty_like(dg)
            step = max(1, DENSE_BLOCK // self.h.shape[1])
            for j in range(0, self.h.shape[2], step):
                hd[..., j:j + step] = torch.bmm(dg, self.h[:, :, j:j + step].to(dg.dtype))
        return hd

    def __call__(self, diff: np.ndarray) -> np.ndarray:
        """diff: (..., C, K) → (..., C); plain squared error when no H is known."""
        d = torch.from_numpy(np.ascontiguousarray(diff, np.float32))
        if self.f is not None:
            dg = self._grouped(d)
            with fixed_order():
                e = torch.bmm(dg, self.f.transpose(1, 2)).pow(2).sum(-1)  # (G, rows)
                if self.ridge is not None:
                    e = e + self.ridge[:, None] * dg.pow(2).sum(-1)
            return self._ungrouped(e[..., None], d.shape[:-2])[..., 0].double().numpy()
        return (self.hmul(d) * d).sum(-1).double().numpy()

    def screen(self, diff: np.ndarray) -> np.ndarray:
        """An estimate of the error per channel of (..., C, K), for ranking candidates (`least_error`):
        exact on H's SCREEN_RANK leading directions (the input mean's among them, which dominates
        the H of a layer after a ReLU), diagonal on the rest: dᵀUUᵀd + Σ_k (H − UUᵀ)_kk d_k². A
        product of rank SCREEN_RANK instead of K; exact when no H is known."""
        d = torch.from_numpy(np.ascontiguousarray(diff, np.float32))
        if not self.known:
            return d.pow(2).sum(-1).double().numpy()
        u, rest = self._screen
        dg = self._grouped(d)
        with fixed_order():
            e = torch.bmm(dg, u).pow(2).sum(-1) + (dg * dg * rest[:, None, :]).sum(-1)  # (G, rows)
        return self._ungrouped(e[..., None], d.shape[:-2])[..., 0].double().numpy()

    @cached_property
    def _screen(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U (G, K, r) with UUᵀ ≈ H on its leading directions, diag(H − UUᵀ) (G, K)): a seeded range
        finder with two power steps and a Rayleigh–Ritz projection, deterministic and O(K²r)."""
        g, k = self.groups, (self.h if self.h is not None else self.f).shape[-1]
        r = min(SCREEN_RANK, k)
        omega = torch.randn(k, min(2 * r, k), generator=torch.Generator().manual_seed(0)).expand(g, -1, -1)
        with fixed_order():
            y = self._hmat(self._hmat(omega))
            q = torch.linalg.qr(y).Q
            lam, v = torch.linalg.eigh(torch.bmm(q.transpose(1, 2), self._hmat(q)).double())
            u = torch.bmm(q.double(), v[:, :, -r:]) * lam[:, -r:].clamp_min(0).sqrt()[:, None, :]
            if self.f is None:
                diag = torch.diagonal(self.h, dim1=1, dim2=2)
            else:  # the factor's diagonal, plus ρ in a search
                diag = (self.f * self.f).sum(1) + (0 if self.ridge is None else self.ridge[:, None])
            rest = (diag.double() - u.pow(2).sum(-1)).clamp_min(0)
        return u.float(), rest.float()

    def _hmat(self, x: torch.Tensor) -> torch.Tensor:
        """H X for X (G, K, m)."""
        if self.f is not None:
            return self._ridged(torch.bmm(self.f.transpose(1, 2), torch.bmm(self.f, x)), x)
        return torch.bmm(self.h, x)

    def energy(self, w: np.ndarray) -> np.ndarray:
        """wᵀ H w per channel: the channel's output energy, for relative errors."""
        return self(w)

    def inner(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """aᵀ H b per output channel for (C, K) arrays (plain dot products when no H is known)."""
        if not self.known:
            return (np.asarray(a, np.float64) * np.asarray(b, np.float64)).sum(-1)
        return (self.hmul(a) * torch.from_numpy(np.ascontiguousarray(b, np.float32))).sum(-1).double().numpy()

    def refit_scale(self, w: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """Per-channel s minimising the output error of s·q against w: qᵀHw / qᵀHq (the old scale
        where q is all zero). q (..., C, K) and scale (..., C) may hold a batch of candidates for the
        one w (C, K); qᵀHq and qᵀHw share one product Hq."""
        if not self.known:
            qq, qw = self.inner(q, q), self.inner(q, np.broadcast_to(w, q.shape))
        else:
            hq = self.hmul(q)
            qq = (hq * torch.from_numpy(np.ascontiguousarray(q, np.float32))).sum(-1).double().numpy()
            qw = (hq * torch.from_numpy(np.ascontiguousarray(w, np.float32))).sum(-1).double().numpy()
        return np.where(qq > 0, qw / np.where(qq > 0, qq, 1.0), scale)


def gathers_cheaper(nnz: np.ndarray, k: int) -> np.ndarray:
    """Whether qᵀHq of a row with `nnz` nonzeros is cheaper from its nnz×nnz block of H than from a
    dense product with all of H. Measured on one core (float64 BLAS, K = 4608): a dense row costs
    about 3·10⁻¹¹·K² s; gathering the block about 5·10⁻⁵ + 2.3·10⁻⁹·nnz² s — so a gather pays only on
    large layers with sparse rows (nnz below about K/9 at K = 4608, never below K ≈ 1300)."""
    return 72.0 * nnz.astype(np.float64) ** 2 + 1.6e6 < float(k) ** 2


class Expansion:
    """One layer's output error of s·q against its weights w, expanded per channel as
        e(s, q) = wᵀHw − 2s·qᵀHw + s²·qᵀHq,
    in float64. Hw is computed once for the layer and shared by every candidate q, so a candidate
    costs one product Hq (not two, Hq for its step and H(w − sq) for its error); and under an
    accumulator bound ‖q‖₁ ≤ radius a channel has at most `radius` nonzero integers, often a few
    dozen out of thousands, so on large layers qᵀHq is summed over the nonzeros' block of H alone."""

    def __init__(self, err: ErrorModel, w: np.ndarray):
        self.err = err
        w = np.asarray(w, np.float64)
        self.hw = err.hmul(w, np.float64).numpy()
        self.whw = (self.hw * w).sum(-1)

    def terms(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(qᵀHw, qᵀHq) per channel for integer candidates q (..., C, K) of this layer's w. A
        channel's candidates share one gathered block of H, over the union of their nonzeros."""
        qf = np.asarray(q, np.float64)
        qhw = (qf * self.hw).sum(-1)
        err, k = self.err, qf.shape[-1]
        if not err.known or err.f is not None or err.groups > 1:  # small products: dense throughout
            return qhw, (err.hmul(qf, np.float64).numpy() * qf).sum(-1)
        cand = qf.reshape(-1, err.channels, k)  # (S, C, K)
        qhq = np.empty(cand.shape[:2])
        used = (cand != 0).any(0)  # (C, K): columns any candidate of the channel uses
        sparse = gathers_cheaper(used.sum(1), k)
        dense = np.flatnonzero(~sparse)
        if dense.size:
            rows = cand[:, dense].reshape(-1, k)
            qhq[:, dense] = (err.rows_times_h(torch.from_numpy(rows)[None])[0].numpy() * rows).sum(-1).reshape(len(cand), -1)
        h = err.h[0]
        with fixed_order():
            for c in np.flatnonzero(sparse):
                cols = np.flatnonzero(used[c])
                block = h.index_select(0, torch.from_numpy(cols)).index_select(1, torch.from_numpy(cols)).double()
                v = torch.from_numpy(np.ascontiguousarray(cand[:, c, cols]))  # (S, U)
                qhq[:, c] = ((v @ block) * v).sum(1).numpy()
        return qhw, qhq.reshape(qf.shape[:-1])

    def refit(self, q: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per candidate, the step max(scale, qᵀHw / qᵀHq) — least squares, never finer than `scale`
        — and the error of that step times q."""
        qhw, qhq = self.terms(q)
        s = np.maximum(scale, np.where(qhq > 0, qhw / np.where(qhq > 0, qhq, 1.0), scale))
        return s, np.maximum(self.whw - 2.0 * s * qhw + s * s * qhq, 0.0)


def ratio_grid(bits: int) -> np.ndarray:
    lo = 0.5 if bits >= 6 else 0.25
    return np.linspace(lo, 1.0, 40)


CHUNK_ELEMENTS = 1 << 23  # candidate weights evaluated per batched error call (32 MB of float32)


def least_error(err: ErrorModel, residual: Callable[[np.ndarray], np.ndarray], scales: np.ndarray,
                keep: int | None = None, chunk: int = CHUNK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the candidate of `scales` (T, C) whose residual (`residual(s)`: (t, C) → (t, C, K))
    has the least error, as (index into T, its error); the first of equal ones. With `keep`, every
    candidate is ranked by `err.screen` and only each channel's `keep` best are evaluated in full:
    the full product, rank K instead of SCREEN_RANK, is what a coefficient search spends its time on."""
    t, c = scales.shape
    k = residual(scales[:1]).shape[-1]
    step = max(1, chunk // max(c * k, 1))
    cols = np.arange(c)
    if keep is not None and keep < t and err.known:
        proxy = np.concatenate([err.screen(residual(scales[i:i + step])) for i in range(0, t, step)])
        pick = np.sort(np.argpartition(proxy, keep - 1, axis=0)[:keep], axis=0)  # (keep, C), in T order
    else:
        pick = np.broadcast_to(np.arange(t)[:, None], (t, c))
    errors = np.empty(pick.shape)
    for i in range(0, len(pick), step):
        errors[i:i + step] = err(residual(scales[pick[i:i + step], cols]))
    best = errors.argmin(0)
    return pick[best, cols], errors[best, cols]


def clip_search(w: np.ndarray, bits: int, err: ErrorModel | None, screen: int = 0) -> np.ndarray:
    """Per-channel scale: the clip ratio of max|w| with the least error (output error if `err`; the
    first of equal ones), the ratios evaluated in batches. With `screen`, only each channel's
    `screen` best ratios by `ErrorModel.screen` are evaluated exactly (`least_error`)."""
    m = qmax(bits)
    amax = np.abs(w).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    if err is None:
        return amax / m
    scales = amax[None] * ratio_grid(bits)[:, None] / m  # (R, C)
    best, _ = least_error(err.for_search(), lambda s: clip_residuals(w, s, bits), scales, screen or None)
    return scales[best, np.arange(w.shape[0])]
