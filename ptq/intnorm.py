"""Integer LayerNorm and softmax: the arithmetic of the transformer ops of the integer contract.

Both run on int64 codes only; the simulator calls these functions and the integer ONNX twin spells
the same steps in ONNX ops, so the two agree bit for bit (README, "Transformers", states the
constructions and their error bounds).

LayerNorm over the last axis (D values, input codes u = x − z_x at scale s_x), after I-BERT (Kim et
al. 2021): c_i = D·u_i − Σu is D times the deviation from the mean, exactly; V = Σc_i² + ε_q with
ε_q = round(D³·ε/s_x²) is D³ times the variance plus ε in code units; r = ⌊√V⌋ (an exact integer
square root); t_i = round(c_i·2^K / r) ≈ (x_i − μ)/√(σ² + ε)/√D in K fractional bits. The output
requantizer is per channel: y_j = round((t·m_j + b_j) / 2^n_j) + z_y with m_j/2^n_j ≈ γ_j·√D/(s_y·2^K)
(signed) and b_j = round(β_j·2^n_j/s_y).

Softmax over the last axis: d_i = max(x) − x_i ≥ 0 in codes (the zero point cancels),
E_i = table[min(d_i, L − 1)] with table[d] = round(2^F·exp(−s_x·d)) (the row maximum gets 2^F), and
y_i = round(E_i·(m/2^n) / ΣE) + z_y with m/2^n ≈ 1/s_y, one exact rounding division. An optional
keep mask (an attention mask: 0 for padding) sets E = 0 on the keys it drops.
"""
from __future__ import annotations

import torch

FRAC_BITS = 20  # K: fractional bits of the normalised LayerNorm value t
MAX_SHIFT = 46  # LayerNorm requantizer shifts stay below this, so the bias round(β·2^n/s_y) fits int64
EXP_BITS = 20  # F: the softmax table's largest entry is 2^F


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """⌊√v⌋ of non-negative int64 values, exact: the float64 square root is within one of it
    (v < 2^63), and one step down and one up correct it."""
    r = torch.floor(torch.sqrt(v.to(torch.float64))).to(torch.int64)
    r = r - (r * r > v).to(torch.int64)
    return r + ((r + 1) * (r + 1) <= v).to(torch.int64)


def floor_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⌊a/b⌋ for int64 a and positive int64 b."""
    return torch.div(a, b, rounding_mode="floor")


def layernorm_t(u: torch.Tensor, eps_q: int, frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """t_i = round(c_i·2^K / r) over the last axis of int64 centred codes u."""
    d = u.shape[-1]
    c = d * u - u.sum(-1, keepdim=True)
    r = torch.clamp(isqrt((c * c).sum(-1, keepdim=True) + eps_q), min=1)
    return floor_div(2 * (c << frac_bits) + r, 2 * r)


def softmax_codes(x: torch.Tensor, table: torch.Tensor, mult: int, shift: int,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """round(E_i·(mult/2^shift) / ΣE) over the last axis of int64 codes x (before the zero point).

    `keep` (int64 0/1, broadcast to x): the keys it drops get E = 0 and do not enter the maximum;
    a row with every key dropped gives zeros."""
    if keep is not None:
        x = x * keep + (keep - 1)  # a dropped key's code becomes −1, below every kept one
    d = torch.clamp(x.amax(-1, keepdim=True) - x, min=0, max=table.numel() - 1)
    e = table[d] if keep is None else table[d] * keep
    total = torch.clamp(e.sum(-1, keepdim=True), min=1) << shift
    return floor_div(2 * e * mult + total, 2 * total)
