"""Integer simulator: executes a manifest with integer arithmetic only and measures accumulators.

Activation codes are carried as integer-valued float32 tensors (codes have at most 16 bits, so
float32 holds them exactly) and handed out as int64. Convolutions and matrix products run as
float32 GEMMs on integer values split into digits: every product of a digit and a weight is an
exact integer and every partial sum is bounded by Σ|q|·max|digit| < 2^24, so no rounding can happen
in any summation order; the digit results are recombined in float64, exact below 2^53. (Where even
one-bit digits would not fit, float64 is used for the GEMM.) Requantization is m·acc followed by a
rounding right shift, done in float64 when a bound proves every intermediate exact and in int64
otherwise (`intmath.dyadic_sum`); both give the same integers.

Accumulator modes: `exact` (report only), `wrap` (two's complement at P bits, the same at
every MAC as on the final sum since wrapping is modular), `saturate` (clip at P bits after each MAC,
in the documented order: bias first, then the K products of the patch in (c, kh, kw) order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ManifestError
from .. import bitserial
from ..ir import Kernel, Op, execute, require_all
from ..ir.floatops import maxpool, pad, permute, pool_sum, reshape, slice_
from ..intmath import F32_EXACT, dyadic_sum, qmax, rounding_shift
from .. import intnorm
from ..manifest import Manifest

EXACT_LIMIT = 2**52
CODE = torch.float32  # carrier of activation codes (exact: codes have <= 16 bits)
ACC_MODES = ("exact", "wrap", "saturate")


@dataclass
class LayerAccStats:
    """Accumulator behaviour of one layer over everything simulated so far."""

    bits: int
    data_free_bits: int
    max_abs: int = 0
    overflows: int = 0
    outputs: int = 0
    # bit-serial cycles (SWIS layers, ptq.bitserial): per sample from the weights, summed over samples
    cycles_per_sample: int | None = None
    baseline_per_sample: int | None = None
    samples: int = 0

    def to_dict(self) -> dict:
        needed = int(self.max_abs).bit_length() + 1
        out = {"accumulator_bits": self.bits, "max_abs_acc": int(self.max_abs), "bits_needed": needed,
               "headroom_bits": self.bits - needed, "overflows": int(self.overflows),
               "data_free_bits": self.data_free_bits, "data_free_ok": self.data_free_bits <= self.bits}
        if self.cycles_per_sample is not None:
            out.update(bitserial_cycles=self.cycles_per_sample * self.samples,
                       bitserial_baseline_cycles=self.baseline_per_sample * self.samples)
        return out


def _bitserial_cycles(m: Manifest, rec: dict) -> tuple[int, int] | tuple[None, None]:
    """Per-sample cycles of a SWIS layer recounted from its integer weights and issue order, and the
    b₀-cycle baseline (ptq.bitserial); (None, None) for other schemes."""
    w = rec["weight"]
    if w["scheme"] != "swis":
        return None, None
    q = m.tensor(w["terms"][0]["q"])
    s, _ = bitserial.layer_schedule(q, w["group"], w["lanes"], w["shared_bits"], w["bits"], w["out_positions"],
                          m.tensor(w["extra"]["order"]))
    return s["cycles"], s["baseline_cycles"]


def _wrap(acc: torch.Tensor, bits: int) -> torch.Tensor:
    half = 1 << (bits - 1)
    return torch.remainder(acc + half, 1 << bits) - half


def _may_saturate(u: torch.Tensor, q: torch.Tensor, bias: torch.Tensor, lim: int) -> bool:
    """Whether some partial sum could pass ±lim: not when |b_c| + Σ|q_c|·max|u| ≤ lim for every
    channel, and then the sequential saturating MACs equal the exact sum (no loop needed)."""
    umax = max(-float(u.min()), float(u.max())) if u.numel() else 0.0
    l1 = q.abs().reshape(q.shape[0], -1).sum(1).double()
    return bool((bias.abs().double() + l1 * umax > lim).any())


def _saturating_conv(x: torch.Tensor, q: torch.Tensor, bias: torch.Tensor, op: Op, bits: int) -> torch.Tensor:
    """Sequential MACs with saturation after each one (bias first, then (c, kh, kw) order)."""
    lim = qmax(bits)
    if op.kind == "linear":
        cols = x[:, None, :]  # (N, 1, K)
        groups, out_shape = 1, None
    else:
        a = op.attrs
        kh, kw = q.shape[2], q.shape[3]
        # im2col has no integer kernel: float64 holds these codes exactly (|u| < 2^17)
        cols = F.unfold(x.to(torch.float64), (kh, kw), dilation=a["dilation"], padding=a["padding"], stride=a["stride"])
        groups = a["groups"]
        cols = cols.transpose(1, 2)  # (N, L, C*kh*kw)
        out_shape = a.get("out_shape")
    n, L, _ = cols.shape
    c_out = q.shape[0]
    qg = q.reshape(groups, c_out // groups, -1)  # (G, Co/G, K)
    colg = cols.reshape(n, L, groups, -1).to(torch.int64)  # (N, L, G, K)
    acc = bias.reshape(1, 1, groups, c_out // groups).expand(n, L, groups, c_out // groups).clone()
    for k in range(qg.shape[2]):
        acc = torch.clamp(acc + colg[:, :, :, k:k + 1] * qg[None, None, :, :, k], -lim, lim)
    acc = acc.reshape(n, L, c_out).transpose(1, 2)
    if op.kind == "linear":
        return acc[:, :, 0]
    return acc.reshape(n, c_out, out_shape[1], out_shape[2])


def _gemm(op: Op, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if op.kind == "conv":
        a = op.attrs
        return F.conv2d(x, q, None, a["stride"], a["padding"], a["dilation"], a["groups"])
    return F.linear(x, q)


def integer_gemm(op: Op, u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Exact Σ q·u as an integer-valued float64 tensor, for integer-valued u and float32 weights q."""
    l1 = float(q.abs().reshape(q.shape[0], -1).sum(1).max()) if q.numel() else 0.0
    umax = max(-float(u.min()), float(u.max())) if u.numel() else 0.0
    if l1 * umax < F32_EXACT:
        return _gemm(op, u.to(torch.float32), q).to(torch.float64)
    digit_bits = int(np.floor(np.log2(F32_EXACT / l1)))
    if digit_bits < 1:
        accf = _gemm(op, u.to(torch.float64), q.to(torch.float64))
        if float(accf.abs().max()) >= EXACT_LIMIT:
            raise ManifestError(f"layer {op.name}: partial sums reach 2^52, beyond exact simulation")
        return accf
    base = float(1 << digit_bits)
    u = u.to(torch.float64)
    acc = torch.zeros((), dtype=torch.float64)
    rest, weight = u, 1.0
    while True:
        hi = torch.floor(rest / base)
        lo = rest - hi * base  # 0 <= lo < base
        acc = acc + _gemm(op, lo.to(torch.float32), q).to(torch.float64) * weight
        if float(hi.abs().max()) * l1 < F32_EXACT:
            return acc + _gemm(op, hi.to(torch.float32), q).to(torch.float64) * (weight * base)
        rest, weight = hi, weight * base


class Simulator:
    """Integer execution of one manifest. `accumulator` overrides the manifest's mode for all layers."""

    def __init__(self, m: Manifest, accumulator: str | None = None, bits: int | None = None):
        if accumulator is not None and accumulator not in ACC_MODES:
            raise ValueError(f"accumulator mode must be one of {ACC_MODES}")
        self.m = m
        self.graph = m.to_graph()
        self.mode = accumulator
        self.bits = bits
        self.layers: dict[str, LayerAccStats] = {}
        self._w: dict[str, list] = {}

    # -- helpers --
    def _enc(self, t: str) -> tuple[int, int]:
        e = self.m.encoding(t)
        return int(e["zero_point"]), (1 << e["bits"]) - 1

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        e = self.m.encoding(self.graph.input)
        q = torch.floor(x.to(torch.float64) / e["scale"] + 0.5) + e["zero_point"]
        return torch.clamp(q, 0, (1 << e["bits"]) - 1).to(CODE)

    def dequantize(self, q: torch.Tensor, t: str) -> np.ndarray:
        e = self.m.encoding(t)
        return (e["scale"] * (q.to(torch.float64) - e["zero_point"])).numpy()

    def _weights(self, op: Op):
        if op.name not in self._w:
            rec = op.record
            terms = [torch.from_numpy(self.m.tensor(t["q"]).astype(np.float32)) for t in rec["weight"]["terms"]]
            mult = torch.from_numpy(self.m.tensor(rec["requant"]["multiplier"]).astype(np.int64))
            shift = torch.from_numpy(self.m.tensor(rec["requant"]["shift"]).astype(np.int64))
            bias = torch.from_numpy(self.m.tensor(rec["bias"]["q"]).astype(np.int64))
            acc = rec.get("accumulator", {})
            bits = self.bits if self.bits is not None else acc.get("bits", 32)
            mode = self.mode or acc.get("mode", "exact")
            self._w[op.name] = [terms, mult, shift, bias, bits, mode]
            self.layers[op.name] = LayerAccStats(bits, acc.get("data_free_bits", 0))
            self.layers[op.name].cycles_per_sample, self.layers[op.name].baseline_per_sample = _bitserial_cycles(self.m, rec)
        return self._w[op.name]

    # -- kernels (inputs and outputs are integer-valued CODE tensors) --
    def _weighted(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        if op.kind == "linear" and xs[0].dim() > 2:  # every leading position (token) is one row
            x = xs[0]
            return self._weighted(op, [x.reshape(-1, x.shape[-1])]).reshape(*x.shape[:-1], -1)
        terms, mult, shift, bias, bits, mode = self._weights(op)
        z, _ = self._enc(op.inputs[0])
        zy, _ = self._enc(op.output)
        u = xs[0] - z
        view = (1, -1, 1, 1) if op.kind == "conv" else (1, -1)
        st = self.layers[op.name]
        st.samples += xs[0].shape[0]
        lim = qmax(bits)
        accs, bounds = [], []
        for t, q in enumerate(terms):
            b = bias if t == 0 else torch.zeros_like(bias)
            acc = integer_gemm(op, u, q).add_(b.to(torch.float64).reshape(view))
            reduce = [d for d in range(acc.dim()) if d != 1]
            chan_abs = torch.maximum(acc.amax(dim=reduce, keepdim=True), -acc.amin(dim=reduce, keepdim=True)) \
                if acc.numel() else torch.zeros(view, dtype=torch.float64)
            max_abs = int(chan_abs.max())
            st.max_abs = max(st.max_abs, max_abs)
            if mode == "saturate" and _may_saturate(u, q, b, lim):
                # an overflow is an output the saturating MAC sequence changed
                sat = _saturating_conv(u.to(torch.int64), q.to(torch.int64), b, op, bits).to(torch.float64)
                st.overflows += int((sat != acc).sum())
                acc = sat
            elif max_abs > lim:
                st.overflows += int((acc.abs() > lim).sum())
            st.outputs += acc.numel()
            if mode == "wrap":
                acc = _wrap(acc, bits)
            if st.max_abs >= 2**32:
                raise ManifestError(f"layer {op.name}: accumulator {st.max_abs} exceeds the 32-bit requantizer input")
            accs.append(acc)
            bounds.append(chan_abs if mode == "exact" else chan_abs.clamp(max=float(1 << (bits - 1))))
        y = dyadic_sum(accs, [mult[t].reshape(view) for t in range(len(terms))], shift.reshape(view), bounds)
        lo, hi = op.record["clamp"]
        return y.add_(zy).clamp_(lo, hi).to(CODE)

    def _requant_inputs(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        """round(Σ m_i·(x_i - z_i) / 2^n) of an add's inputs (float64, exact by intmath.dyadic_sum)."""
        r = op.record["requant"]
        parts = [x - self._enc(t)[0] for x, t in zip(xs, op.inputs)]
        return dyadic_sum(parts, [torch.tensor(m) for m in r["multiplier"]], torch.tensor(r["shift"]),
                          [float(1 << self.m.encoding(t)["bits"]) for t in op.inputs])

    def _add(self, op: Op, xs):
        y = self._requant_inputs(op, xs)
        return y.add_(self._enc(op.output)[0]).clamp_(*op.record["clamp"]).to(CODE)

    def _concat(self, op: Op, xs):
        r = op.record["requant"]
        zy = self._enc(op.output)[0]
        parts = [dyadic_sum([x - self._enc(t)[0]], [torch.tensor(m)], torch.tensor(r["shift"]),
                            [float(1 << self.m.encoding(t)["bits"])]) + zy
                 for x, t, m in zip(xs, op.inputs, r["multiplier"])]
        return torch.cat(parts, dim=op.attrs["dim"]).clamp_(*op.record["clamp"]).to(CODE)

    def _avgpool(self, op: Op, xs):
        r = op.record["requant"]
        z = self._enc(op.inputs[0])[0]
        s, count = pool_sum(op, (xs[0] - z).to(torch.float64))
        if count != r["count"]:
            raise ManifestError(f"layer {op.name}: pooling window {count} differs from the manifest's {r['count']} (input size changed?)")
        bound = float(count << self.m.encoding(op.inputs[0])["bits"])
        y = dyadic_sum([torch.round(s)], [torch.tensor(r["multiplier"][0])], torch.tensor(r["shift"]), [bound])
        return y.add_(self._enc(op.output)[0]).clamp_(*op.record["clamp"]).to(CODE)

    def _lut(self, op: Op, xs):
        table = torch.from_numpy(self.m.tensor(op.record["table"]).astype(np.float32))
        return table[xs[0].to(torch.int64)]

    def _matmul(self, op: Op, xs):
        """Σ_k (a − z_a)(b − z_b), exact in float64 (|a − z_a|·|b − z_b|·K < 2^53 is checked), then
        the dyadic requantizer."""
        (za, _), (zb, _) = self._enc(op.inputs[0]), self._enc(op.inputs[1])
        a, b = (xs[0] - za).to(torch.float64), (xs[1] - zb).to(torch.float64)
        bound = float(a.abs().max()) * float(b.abs().max()) * a.shape[-1] if a.numel() and b.numel() else 0.0
        if bound >= 2.0 ** 53:
            raise ManifestError(f"layer {op.name}: matmul partial sums reach 2^53, beyond exact simulation")
        r = op.record["requant"]
        y = dyadic_sum([torch.matmul(a, b)], [torch.tensor(r["multiplier"][0])], torch.tensor(r["shift"]), [bound])
        return y.add_(self._enc(op.output)[0]).clamp_(*op.record["clamp"]).to(CODE)

    def _scale(self, op: Op, xs):
        r = op.record["requant"]
        u = xs[0].to(torch.float64) - self._enc(op.inputs[0])[0]
        y = dyadic_sum([u], [torch.tensor(r["multiplier"][0])], torch.tensor(r["shift"]),
                       [float(1 << self.m.encoding(op.inputs[0])["bits"])])
        return y.add_(self._enc(op.output)[0]).clamp_(*op.record["clamp"]).to(CODE)

    def _layernorm(self, op: Op, xs):
        r = op.record["norm"]
        u = xs[0].to(torch.int64) - self._enc(op.inputs[0])[0]
        t = intnorm.layernorm_t(u, int(r["eps_q"]), int(r["frac_bits"]))
        mult, shift, bias = (torch.from_numpy(self.m.tensor(r[k]).astype(np.int64)) for k in ("multiplier", "shift", "bias"))
        y = rounding_shift(t * mult + bias, shift) + self._enc(op.output)[0]
        return y.clamp_(*op.record["clamp"]).to(CODE)

    def _softmax(self, op: Op, xs):
        r = op.record["exp"]
        table = torch.from_numpy(self.m.tensor(r["table"]).astype(np.int64))
        keep = None if len(xs) == 1 else (xs[1].to(torch.int64) != self._enc(op.inputs[1])[0]).to(torch.int64)
        y = intnorm.softmax_codes(xs[0].to(torch.int64), table, int(r["multiplier"]), int(r["shift"]), keep)
        z, top = self._enc(op.output)
        return (y + z).clamp_(0, top).to(CODE)

    def _embedding(self, op: Op, xs):
        r = op.record["embedding"]
        table, offset = (torch.from_numpy(self.m.tensor(r[k]).astype(np.float64)) for k in ("table", "offset"))
        y = table[xs[0].to(torch.int64)] + offset + self._enc(op.output)[0]
        return y.clamp_(0, self._enc(op.output)[1]).to(CODE)

    def _offset(self, op: Op, xs):
        """pad(round(u·m / 2^n), 0) + K + z_y, clamped."""
        r = op.record["requant"]
        u = xs[0].to(torch.float64) - self._enc(op.inputs[0])[0]
        y = dyadic_sum([u], [torch.tensor(r["multiplier"][0])], torch.tensor(r["shift"]),
                       [float(1 << self.m.encoding(op.inputs[0])["bits"])])
        k = torch.from_numpy(self.m.tensor(op.record["offset"]).astype(np.float64))
        return (pad(op, y, 0) + k).add_(self._enc(op.output)[0]).clamp_(*op.record["clamp"]).to(CODE)

    def kernels(self) -> dict[str, Kernel]:
        return require_all("simulator", {
            "conv": self._weighted, "linear": self._weighted, "add": self._add, "concat": self._concat,
            "avgpool": self._avgpool, "lut": self._lut,
            "clamp": lambda op, xs: torch.clamp(xs[0], *op.record["clamp"]),
            "maxpool": lambda op, xs: maxpool(op, xs[0], float(op.record["pad_value"])),
            "reshape": lambda op, xs: reshape(op, xs[0]),
            "pad": lambda op, xs: pad(op, xs[0], int(op.record["pad_value"])),
            "matmul": self._matmul, "scale": self._scale, "layernorm": self._layernorm, "softmax": self._softmax,
            "embedding": self._embedding, "offset": self._offset,
            "permute": lambda op, xs: permute(op, xs[0]), "slice": lambda op, xs: slice_(op, xs[0]),
        })

    def run(self, x: torch.Tensor, keep=()) -> dict[str, torch.Tensor]:
        """Integer codes of the outputs (and `keep` tensors) for float inputs x (N, C, H, W)."""
        with torch.no_grad():
            out = execute(self.graph, self.quantize_input(x), self.kernels(), keep=keep)
        return {t: v.to(torch.int64) for t, v in out.items()}

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        """Dequantized first output for float inputs (what `QuantizedModel.simulate` returns)."""
        out = self.graph.outputs[0]
        return self.dequantize(self.run(x)[out], out)
