"""A depthwise conv's input-patch moments from shifted products of its input map, no patches copied.

Tap t of a window reads the padded map at the window's base plus a_t. The sum over windows of tap
t's value times tap u's is the sum, over the bases shifted by a_t, of one product map
M_d = Σ_images x · (x shifted by d), d = a_u − a_t. Tap pairs with the same d share M_d: a 5×5
kernel has 41 offsets for its 325 pairs. Copying each window's K taps and multiplying them in a
batched GEMM only K wide costs about 20× more per element than one map pixel of one offset, so where
most output positions are kept (Lite0's depthwise layers from 28×28 down) the maps are 3–5× cheaper;
where a few positions are sampled from a large map, copying stays cheaper (`cheaper_by_shifts`).
The sums are the patches' in another order, both in float32: equal to float32 rounding, not bit for bit.
"""
from __future__ import annotations

import torch


def window_bases(oh: int, ow: int, stride: tuple[int, int], wp: int, positions: torch.Tensor | None) -> torch.Tensor:
    """Flat index, in a padded map `wp` wide, of each kept window's first tap: output positions
    `positions` (flat over oh×ow; None: all of them, in order)."""
    pos = torch.arange(oh * ow) if positions is None else positions
    return (pos // ow) * stride[0] * wp + (pos % ow) * stride[1]


def tap_offsets(kh: int, kw: int, dilation: tuple[int, int]) -> list[tuple[int, int]]:
    """(row, column) of each tap in a window, row-major as a patch's columns are."""
    return [(ky * dilation[0], kx * dilation[1]) for ky in range(kh) for kx in range(kw)]


def cheaper_by_shifts(kh: int, kw: int, hp: int, wp: int, windows: int) -> bool:
    """Whether the product maps (hp·wp pixels per offset) cost less than copying the windows' taps and
    multiplying them (windows·K copied elements), for one channel and image. Measured on Lite0's
    depthwise shapes (session 33, one thread): about 0.45 ns per map pixel and offset, and 6.5–25 ns
    per copied element (the copy and a GEMM only K wide; the more so the larger the map); 15 ns is
    the crossover the shapes agree on."""
    offsets = ((2 * kh - 1) * (2 * kw - 1) + 1) // 2
    return hp * wp * offsets < 15 * windows * kh * kw


MAP_ELEMENTS = 1 << 21  # product maps made and reduced this many elements at a time


def shifted_moments(x: torch.Tensor, taps: list[tuple[int, int]], bases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over images and windows of patch·patchᵀ (c, K, K) and of patch (c, K), for the padded map x
    (n, c, hp, wp) of a depthwise conv whose windows start at flat `bases` and read `taps`.

    On the flattened map, tap u's pixel is tap t's plus a shift s ≥ 0 (taps are row-major), so each
    shift's product map is one pass over the batch. Summing a map over each tap's window pixels is a
    product with a 0/1 matrix (pixel, tap), which gives every tap pair of a shift at once."""
    n, c, hp, wp = x.shape
    size, k = hp * wp, len(taps)
    offsets = torch.tensor([ty * wp + tx for ty, tx in taps])
    t, u = torch.triu_indices(k, k)
    pair_shift = offsets[u] - offsets[t]
    shifts, shift_of_pair = torch.unique(pair_shift, return_inverse=True)
    flat = x.reshape(n, c, size)
    select = x.new_zeros(size, k)
    select[bases[:, None] + offsets[None, :], torch.arange(k)[None, :]] = 1
    sums = x.new_empty(len(shifts), c, k)  # [shift, channel, t]: Σ over windows of tap t × the pixel `shift` on
    per_chunk = max(1, MAP_ELEMENTS // (c * size))
    for first in range(0, len(shifts), per_chunk):
        chunk = shifts[first:first + per_chunk].tolist()
        maps = x.new_zeros(len(chunk), c, size)
        for i, shift in enumerate(chunk):
            out = maps[i, :, :size - shift]
            for m in range(n):  # image by image into the map: no n-fold temporary, and 10-25% faster than mul + sum
                out.addcmul_(flat[m, :, :size - shift], flat[m, :, shift:])
        sums[first:first + len(chunk)] = (maps.view(-1, size) @ select).view(len(chunk), c, k)
    values = sums[shift_of_pair, :, t]  # (pairs, c)
    xx = x.new_empty(c, k, k)
    xx[:, t, u] = values.T
    xx[:, u, t] = values.T
    return xx, flat.sum(0) @ select


__all__ = ["cheaper_by_shifts", "shifted_moments", "tap_offsets", "window_bases"]
