"""Learned rounding (`weights.rounding = "learned"`): block-wise AdaRound on every scheme's grid.

Sources: M. Nagel, R. A. Amjad, M. van Baalen, C. Louizos, T. Blankevoort, "Up or Down? Adaptive
Rounding for Post-Training Quantization", ICML 2020 (the relaxation and its regulariser); Y. Li,
R. Gong, X. Tan, Y. Yang, P. Hu, Q. Zhang, F. Yu, W. Wang, S. Gu, "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction", ICLR 2021 (optimising a block's output, with
the inputs taken from the model quantized so far).

**The relaxation.** A weight whose real value is x (in units of its term's scale; for multipoint, a
channel's last point against the residual of its earlier points, as for error feedback) may become
either of its two grid neighbours `down ≤ x < up` (`Grid.neighbours`: floor and ceiling clipped to
the b-bit grid, or a SWIS group's nearest set values below and above); round-to-nearest is one of
them, and a learned weight never leaves its pair. During the optimisation the weight is
down + h(V)·(up − down) with the rectified sigmoid h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1), ζ = 1.1,
γ = −0.1, V initialised so that h is the fractional position of x between the two. Adam moves V only
(`rounding.learning_rate`) on

    loss = mean (block output − FP32 block output)² / e₀  +  λ · mean (1 − |2h − 1|^β)

over the mini-batch's output elements and the block's weights that have two neighbours; e₀ is the
block's mean squared error with the method's integers and λ = `rounding.regularizer` **(ours:
AdaRound sums both terms, which ties λ to the block's output size and error; measured in these
units one λ suits every block)**. The regulariser is off for the first fifth of the
`rounding.iterations` steps, then β falls linearly from 20 to 2, which drives each h to 0 or 1.
Each weight finally takes `up` where h ≥ ½, else `down`. The scales never change.

**The objective** (`rounding.objective`). To second order, the divergence of the model's output
distribution that an error δ_c in output channel c of a block causes grows with F_c·δ_c², F_c the
channel's Fisher sensitivity (`calib.sensitivity`, the measure multipoint and the allocator rank
by); a plain mean square treats every channel alike. `mse` is the plain mean square above; `fisher`
weighs each output channel's squared error by F_c over the channels' mean, and e₀ and the guard
below are measured in the same weighting. **(Ours: BRECQ weighs every sample's every element by its
own squared gradient. Measured on Lite0 `w4a8` with the model's own sampled labels (no labels are
given here), four draws per sample: 58.2% top-1 agreement, against 71.1% per channel and 66.4% with
`mse` — too noisy at 64 samples, so it is not offered.)**

**Blocks** (`ptq.methods.blocks`). An MBConv's expand 1×1 → depthwise → project 1×1 is one block,
optimised for its output, because a depthwise conv's own output error says little about the
model's; every learned layer without a depthwise neighbour is its own block. Tensors inside a block
are fake-quantized as the reference quantizes them (straight-through gradients). A step on a block
with maps larger than CROP×CROP runs on a random CROP×CROP window of its output **(ours: the
window is exact, its border is the ops' own padding; a step on a 112×112 map then costs what one on
an 8×8 map does, what makes the method fit a CPU)**.

**Sequential inputs** (`ptq.methods.walk`). Each block is optimised on its input in the model
quantized so far (earlier layers' integers as decided, every tensor fake-quantized) and its output
in the FP32 model, over the first `rounding.samples` calibration samples, in mini-batches of
`rounding.batch_size` drawn by a fixed-seed generator; the quantized model then runs on through the
block with its new integers.

**Mirrored samples (ours; `rounding.flip`).** The samples matter most (see Defaults), and the
calibration photos are all a user has: with `flip`, the walk runs on each sample and on its
left-right mirror image, twice the samples for the same steps. A model trained with mirrored
photos (ImageNet classifiers are) sees a mirror image as one more photo; where a mirror image
means something else (rendered text, a spectrogram) it stays off, as by default. Measured on Lite0
over three calibration draws (BENCHMARKS.md, session 27): `w4a8-learned` 69.5–77.7% top-1
agreement and mean KL 0.197 against 59.8–74.6% and 0.220, `bitplane-4.5-learned` mean KL 0.077
against 0.081, for 5–19% more method time.

**Random drop** (`rounding.drop`; X. Wei, R. Gong, Y. Li, X. Liu, F. Yu, "QDrop: Randomly Dropping
Quantization for Extremely Low-bit Post-Training Quantization", ICLR 2022). During the optimisation
each activation value inside the block, and each value of its input, keeps its float value with
probability `drop` instead of its quantized one (for the input: the FP32 model's block input against
the quantized stream's), drawn afresh each step by the seeded generator; so the rounding is fitted
over a neighbourhood of the activation noise it will meet, not to one instance of it. The error
measurements and the guard below use every quantizer. Measured (BENCHMARKS.md, session 22): at
8-bit activations on Lite0, 0.5 gave `w4a8-learned` the same mean KL over three draws with 4 points
less mean top-1 agreement and `bitplane-4.5-learned` a higher KL on both draws tried, so it is off
(0) by default; on the digits CNN at 4-bit activations it lowered the mean KL by 30%.

**Bias** (`rounding.bias_rate`; the issue's "fold the bias into the learned objective"). With a
rate above 0, each layer of a block learns its bias with its rounding: b + u·(output range / 255)
per output channel, u from zero, moved by Adam at that rate alongside V and not regularised. The
block keeps it with its learned integers (guard below), the model quantized so far runs on with it,
the manifest stores it as the layer's bias, and bias correction afterwards starts from it. An
accumulator layer keeps its bias, which its bound counts. **(Ours: AdaRound and BRECQ leave the
bias alone; AdaQuant, Hubara et al. 2021, learns it with the weights.)**

**Start (ours; `rounding.start`).** `nearest`: each weight's pair is around its own value and the
relaxation starts from the method's nearest integers. `feedback`: error feedback (GPTQ, on the
calibration H; `ptq.methods.rounding`) runs first, each weight's pair is around the value feedback
rounded (the weight plus the errors of earlier columns pushed onto it), so h starts at feedback's
integers, and the guard below compares with feedback's integers.

**Guards (ours).** A block keeps its learned integers only where its output error on the samples is
no larger than with the integers it started from (the method's nearest, or feedback's); an
accumulator layer's channel keeps those where the learned ones would exceed its budgets (its bound
holds by construction). Each layer records its output error (H-based, as for feedback) with the
method's nearest and with the learned integers, and its block's relative output error on the
samples with the integers it started from and with the learned ones.

**Determinism.** Every torch op runs single-threaded (`determinism.fixed_order`): convolutions and
their gradients sum in a thread-count-dependent order, and a last-bit difference can flip a weight
whose h ends near ½, so the integers are the same bytes at any thread count. The cores work on
slices instead: each step's mini-batch is cut into PARTS slices whose gradients are formed at once
on a thread pool, one slice per core, and summed in slice order (`reconstruction_gradients`); the
cut does not depend on the thread count. With the regulariser's gradient formed in its own pass,
h formed once a step, channels-last feature maps and a fused Adam, a step over EfficientNet-Lite0's
18 blocks takes 0.43 s on 2 cores against 0.79 s before (BENCHMARKS.md, session 26).

**Defaults.** 1000 steps per block on 128 samples: on three Lite0 calibration draws `w4a8-learned`'s
KL fell 36–42% against 300 steps on 64 samples (BENCHMARKS.md). More samples matter most: 1000 steps
on 64 samples was worse on one draw, 300 on 128 better; 2000 steps on 128 gave the same mean KL.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from concurrent.futures import Executor

import numpy as np
import torch

from ..accbound import exceeds
from ..calib.progress import progress
from ..determinism import single_threaded_pool
from ..ir import Graph, LayerWeights, Op, WeightQuant
from ..errors import RecipeError
from ..ir.grids import settle, term_grids
from .base import error_record, layer_error, rounding_targets
from .blocks import Block, Bounds, find_blocks, mixed
from .walk import LayerHook, walk

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (AdaRound)
WARMUP = 0.2  # share of the steps before the regulariser starts
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second
SEED = 0  # the mini-batch and crop generator's seed
PARTS = 2  # slices of each mini-batch whose gradients are formed at once and summed (reconstruction_gradients)
CROP = 8  # output window of a step on a block with larger maps (blocks.py "Crops")


class _Regulariser(torch.autograd.Function):
    """Σ moves·(1 − |2h − 1|^β) with its gradient −2β·moves·sign(2h − 1)·|2h − 1|^(β−1) formed in
    the same pass: one power per weight where autograd's chain through the formula takes three (on
    EfficientNet-Lite0's 1.28M-weight classifier it was two thirds of a step)."""

    @staticmethod
    def forward(ctx, h, moves, beta):
        t = h.mul(2).sub_(1)
        a = t.abs()
        p = a.pow(beta - 1)
        value = moves.sum() - p.mul(a).mul_(moves).sum()
        ctx.save_for_backward(p.mul_(t.sign_()).mul_(moves).mul_(-2.0 * beta))
        return value

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return g * d, None, None


class Relaxed:
    """One layer's rounding variables: weight = fixed + scale·(down + h(V)·(up − down)) per channel,
    where `fixed` holds a multipoint channel's earlier points (zero for single-term schemes); with
    `bias_step`, also its bias: b + bias_step·u per channel, u from zero (module docstring, "Bias").
    `start`: per term, the real values (in units of the scale) whose grid neighbours are the pair,
    in place of the term's target (`rounding.start = "feedback"`: error feedback's updated weights)."""

    def __init__(self, op: Op, wq: WeightQuant, bias_step: float | None = None, start: dict[int, np.ndarray] | None = None):
        self.op, self.wq = op, wq
        c = op.weight.shape[0]
        self.start_bias = wq.float_bias(op.bias if op.bias is not None else np.zeros(c)).astype(np.float64)
        self._b32 = torch.from_numpy(self.start_bias).float()
        self.u = torch.zeros(c, requires_grad=True) if bias_step is not None else None
        self._bias_step = bias_step
        w = op.weight.reshape(c, -1).astype(np.float64)
        k = w.shape[1]
        cols = torch.arange(k).expand(c, k)
        grids = term_grids(wq)
        x, down, up = (torch.zeros(c, k, dtype=torch.float64) for _ in range(3))
        scale = np.zeros(c)
        fixed = wq.dequantized().reshape(c, -1)
        self.term = np.zeros(c, np.int64)
        for t, rows, target in rounding_targets(wq, w):
            q, s = wq.terms[t]
            xt = torch.from_numpy(start[t] if start and t in start else target / s[:, None])
            d, u = grids[t].neighbours(xt, cols)
            r = torch.from_numpy(rows)
            x[r], down[r], up[r] = xt[r], d[r], u[r]
            scale[rows], self.term[rows] = s[rows], t
            fixed[rows] -= q.reshape(c, -1)[rows] * s[rows, None]
        # the integers the layer holds: the method's nearest, or feedback's (`start`); what a block must beat
        self.initial = np.stack([q.reshape(c, -1) for q, _ in wq.terms])[self.term, np.arange(c)].astype(np.int64)
        span = up - down
        frac = torch.where(span > 0, (x - down) / torch.where(span > 0, span, 1.0), 0.0).clamp(0.0, 1.0 - 1e-6)
        self.v = (-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)).float().requires_grad_()
        self.down, self.up = down.numpy().astype(np.int64), up.numpy().astype(np.int64)
        self._down, self._span = down.float(), span.float()
        self.moves = (span > 0).float()
        self._scale, self._fixed = torch.from_numpy(scale).float()[:, None], torch.from_numpy(fixed).float()
        self._scale64, self._fixed64 = scale[:, None], fixed

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def soft_weight(self, h: torch.Tensor) -> torch.Tensor:
        """The relaxed weight for this step's h (`h()`, formed once a step and shared with `regulariser`)."""
        return (self._fixed + self._scale * (self._down + h * self._span)).reshape(self.op.weight.shape)

    def soft_bias(self) -> torch.Tensor:
        return self._b32 if self.u is None else self._b32 + self._bias_step * self.u

    def bias(self) -> np.ndarray:
        """The learned float bias (the starting one without a learned bias)."""
        return self.start_bias if self.u is None else self.start_bias + self._bias_step * self.u.detach().double().numpy()

    def regulariser(self, h: torch.Tensor, beta: float) -> torch.Tensor:
        """Σ (1 − |2h − 1|^β) over the weights that have two neighbours (`_Regulariser`)."""
        return _Regulariser.apply(h, self.moves, beta)

    def integers(self) -> np.ndarray:
        """The learned choice (C, K); an accumulator layer's channel keeps the integers it started
        from (the method's, or feedback's) where the learned ones would exceed its accumulator budgets."""
        with torch.no_grad():
            q = np.where(self.h().numpy() >= 0.5, self.up, self.down)
        budget = self.wq.acc_budget
        if budget is not None:
            q = np.where(exceeds(q, budget)[:, None], self.initial, q)
        return q

    def weight(self, q: np.ndarray) -> torch.Tensor:
        """The real weight with integers q (C, K) on the learned terms."""
        w = self._fixed64 + self._scale64 * q.astype(np.float64)
        return torch.from_numpy(w.astype(np.float32).reshape(self.op.weight.shape))

    def write(self, q: np.ndarray) -> None:
        """Store q (C, K) as each channel's learned term, and a learned bias, in place."""
        wq, c = self.wq, self.op.weight.shape[0]
        if self.u is not None:
            wq.bias = self.bias()
        for t, (old, s) in enumerate(wq.terms):
            rows = (self.term == t)[:, None]
            wq.terms[t] = (np.where(rows, q, old.reshape(c, -1)).reshape(old.shape).astype(np.int64), s)
        settle(wq)


def _fast_layout(x: torch.Tensor) -> torch.Tensor:
    """A feature map in channels-last order, where a CPU depthwise convolution's forward and backward
    run 1.4–2.4× faster (Lite0's shapes, 8 samples, one thread); other tensors as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def reconstruction_gradients(block: Block, xb: torch.Tensor, tb: torch.Tensor, ws: dict[str, torch.Tensor],
                             bs: dict[str, torch.Tensor], quant: dict[str, Bounds], pads, drop, weight: torch.Tensor,
                             unit: float, pool: Executor | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The soft weights and learned biases that require a gradient (weights first), and the gradient
    of the step's reconstruction loss with respect to each, summed over PARTS slices of the
    mini-batch in slice order. The slices run at once on `pool` (single-threaded each), so a step
    uses PARTS cores and its bytes do not depend on how many there are; with `drop` they run in
    turn, as its masks are drawn from one generator."""
    leaves = [t for t in (*ws.values(), *bs.values()) if t.requires_grad]
    free = {id(t): t.detach().requires_grad_() for t in leaves}
    fw = {n: free.get(id(t), t) for n, t in ws.items()}
    fb = {n: free.get(id(t), t) for n, t in bs.items()}
    inputs = [free[id(t)] for t in leaves]
    denom = float(tb.numel()) * unit

    def part(sl: slice) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            out = block.run(_fast_layout(xb[sl]), fw, quant, pads, drop, fb)
            loss = (out - tb[sl]).pow(2).mul(weight).sum() / denom
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs))

    n = xb.shape[0]
    size = -(-n // PARTS)
    slices = [slice(i, min(i + size, n)) for i in range(0, n, size)]
    results = list(pool.map(part, slices) if pool is not None and drop is None and len(slices) > 1 else map(part, slices))
    return leaves, [sum(gs[1:], gs[0]) for gs in zip(*results)]


def optimise(block: Block, relaxed: dict[str, Relaxed], x: torch.Tensor, target: torch.Tensor,
             quant: dict[str, Bounds], settings: dict, gen: torch.Generator, advance: Callable, unit: float,
             weight: torch.Tensor, x_float: torch.Tensor, pool: Executor | None = None) -> None:
    """Adam on the block's rounding variables (module docstring); `unit`: the mean weighted squared
    output error with the nearest integers, which the reconstruction term is measured in; `weight`:
    each output element's weight (broadcast over the output); `x_float`: the FP32 model's block
    input, which `rounding.drop` mixes in."""
    steps = settings["iterations"]
    lam = settings["regularizer"] / max(sum(float(r.moves.sum()) for r in relaxed.values()), 1.0)
    batch = min(settings["batch_size"], x.shape[0])
    groups = [{"params": [r.v for r in relaxed.values()], "lr": settings["learning_rate"]}]
    if settings["bias_rate"] > 0:
        groups.append({"params": [r.u for r in relaxed.values() if r.u is not None], "lr": settings["bias_rate"]})
    opt = torch.optim.Adam(groups, fused=True)  # one pass per tensor: a third of the default's time on CPU
    warm = int(WARMUP * steps)
    h, w = target.shape[-2:] if block.windowed else (0, 0)
    crop = block.windowed and max(h, w) > CROP
    drop = (settings["drop"], gen) if settings["drop"] > 0 else None
    for it in range(steps):
        idx = torch.randint(x.shape[0], (batch,), generator=gen)
        xb, tb, pads = x[idx], target[idx], None
        xf = x_float[idx] if drop else None
        if crop:
            y0, x0 = (int(v) for v in torch.randint(1 << 30, (2,), generator=gen))
            y0, x0 = y0 % max(h - CROP + 1, 1), x0 % max(w - CROP + 1, 1)
            win, pads = block.plan(y0, x0, CROP)
            xb, tb = xb[..., win[0]:win[1], win[2]:win[3]], tb[..., y0:y0 + CROP, x0:x0 + CROP]
            xf = xf[..., win[0]:win[1], win[2]:win[3]] if drop else None
        if drop:
            xb = mixed(xf, xb, drop)
        with torch.enable_grad():
            hs = {n: r.h() for n, r in relaxed.items()}
            ws = {n: r.soft_weight(hs[n]) for n, r in relaxed.items()}
            bs = {n: r.soft_bias() for n, r in relaxed.items()}
            leaves, grads = reconstruction_gradients(block, xb, tb, ws, bs, quant, pads, drop, weight, unit, pool)
            opt.zero_grad()
            if it >= warm:
                rel = (it - warm) / max(steps - warm, 1)
                beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - rel)
                leaves.append(lam * sum(r.regulariser(hs[n], beta) for n, r in relaxed.items()))
                grads.append(torch.ones(()))
            torch.autograd.backward(leaves, grads)
        opt.step()
        advance()


def output_weight(block: Block, stats, settings: dict, dims: int) -> torch.Tensor:
    """Each block output element's weight in the objective: 1 (`rounding.objective = "mse"`), or its
    channel's Fisher sensitivity relative to the channels' mean (`"fisher"`, module docstring),
    shaped to broadcast over a (N, C, H, W) or (N, ..., C) output."""
    if settings["objective"] == "mse":
        return torch.ones(())
    f = stats.fisher.get(block.layers[-1].name)
    if f is None:
        raise RecipeError("rounding.objective = 'fisher' needs the Fisher sensitivity: set calibration.sensitivity_samples > 0 "
                          "or rounding.objective = 'mse'")
    f = torch.from_numpy(f / max(float(f.mean()), 1e-30)).float()
    return f[:, None, None] if dims == 4 else f


def bias_step(b: Bounds) -> float:
    """The unit a learned bias moves in: 1/255 of the layer's output range (an 8-bit output's step;
    the logits' 16-bit step would make the bias 256 times slower)."""
    return (b[2] - b[1]) * b[0] / 255


def learn_block(block: Block, weights: LayerWeights, x: torch.Tensor, target: torch.Tensor,
                quant: dict[str, Bounds], settings: dict, gen: torch.Generator, advance: Callable,
                weight: torch.Tensor, x_float: torch.Tensor,
                starts: dict[str, dict[int, np.ndarray]] | None = None, pool: Executor | None = None) -> dict[str, float]:
    """Learn one block's integers (in place, where they beat nearest on the samples); its relative
    output error on the samples (weighted as the objective weighs it) with nearest and with the result."""
    def step(op: Op) -> float | None:
        """The layer's bias unit where it learns its bias: not on an accumulator layer."""
        learns = settings["bias_rate"] > 0 and weights[op.name].acc_budget is None
        return bias_step(quant[op.output]) if learns else None

    relaxed = {op.name: Relaxed(op, weights[op.name], step(op), (starts or {}).get(op.name)) for op in block.layers}
    size = settings["batch_size"]
    w64 = weight.double()

    def weighted_squares(diff: Callable[[slice], torch.Tensor]) -> float:
        """Σ weight·diff² over the samples, a mini-batch at a time: the float64 squares of a whole
        early feature map would take twice its float32 size (resnet50 with 128 samples: 0.8 GB)."""
        return sum(float(diff(slice(i, i + size)).double().pow(2).mul(w64).sum()) for i in range(0, x.shape[0], size))

    def error(qs: dict[str, np.ndarray], bs: dict[str, np.ndarray]) -> float:
        ws = {n: relaxed[n].weight(q) for n, q in qs.items()}
        b32 = {n: torch.from_numpy(b).float() for n, b in bs.items()}
        return weighted_squares(lambda part: block.run(x[part], ws, quant, biases=b32) - target[part])

    energy = max(weighted_squares(lambda part: target[part]), 1e-30)
    before = error({n: r.initial for n, r in relaxed.items()}, {n: r.start_bias for n, r in relaxed.items()})
    optimise(block, relaxed, x, target, quant, settings, gen, advance, max(before / target.numel(), 1e-30), weight, x_float,
             pool)
    learned = {n: r.integers() for n, r in relaxed.items()}
    after = error(learned, {n: r.bias() for n, r in relaxed.items()})
    if after <= before:
        for n, r in relaxed.items():
            r.write(learned[n])
    return {"block_error_nearest": round(before / energy, 9), "block_error": round(min(after, before) / energy, 9)}


def learn_rounding(graph: Graph, stats, recipe: dict, weights: LayerWeights, layers: list[str],
                   visit: Iterable[str] = (), on_layer: LayerHook | None = None,
                   float_inputs: bool = False, starts: dict[str, dict[int, np.ndarray]] | None = None,
                   nearest: dict[str, np.ndarray] | None = None) -> dict[str, dict]:
    """Re-decide the named layers' integers by block-wise AdaRound (in place; module docstring);
    per layer its output error with nearest and learned integers, and its block's (with the integers
    it started from and the learned ones). `on_layer` is called on the walk before each layer of
    `visit` runs (the sequential feedback rounding); `starts` (`Relaxed`) holds error feedback's
    updated weights per layer, `nearest` the dequantized weights before feedback changed them."""
    settings = recipe["rounding"]
    blocks = find_blocks(graph, set(layers))
    nearest = nearest if nearest is not None else {name: weights[name].dequantized() for name in layers}
    report: dict[str, dict] = {}
    gen = torch.Generator().manual_seed(SEED)
    workers = min(PARTS, torch.get_num_threads())  # read before the walk runs single-threaded
    with progress("learned rounding (block-wise AdaRound)", len(blocks) * settings["iterations"]) as advance, \
            (single_threaded_pool(workers) if workers > 1 else nullcontext()) as pool:
        def on_block(block: Block, x: torch.Tensor, target: torch.Tensor, quant: dict[str, Bounds],
                     x_float: torch.Tensor) -> None:
            weight = output_weight(block, stats, settings, target.dim())
            rec = learn_block(block, weights, x, target, quant, settings, gen, advance, weight, x_float, starts, pool)
            report.update({op.name: rec for op in block.layers})
        walk(graph, stats, recipe, weights, blocks, on_block, visit, on_layer, float_inputs)
    out: dict[str, dict] = {}
    ops = {op.name: op for op in graph.weighted_ops()}
    for name in layers:
        op = ops[name]
        c = op.weight.shape[0]
        w = op.weight.reshape(c, -1).astype(np.float64)
        err = layer_error(op, stats)
        before = err((w - nearest[name].reshape(c, -1)).astype(np.float32))
        after = err((w - weights[name].dequantized().reshape(c, -1)).astype(np.float32))
        out[name] = {**error_record(before, after, err, w), **report[name]}
        if weights[name].bias is not None:
            out[name]["bias"] = "learned"
        if starts and name in starts:
            out[name]["start"] = "feedback"
    return out


__all__ = ["Relaxed", "learn_rounding"]
