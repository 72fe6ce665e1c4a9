"""How well each Fisher sensitivity predicts the divergence a layer's weight error causes (Lite0).

    OMP_NUM_THREADS=1 python -m benchmarks.sensitivity_check [--seed S] [--samples 32]

On the first `--samples` calibration crops of draw S, each weighted layer in turn gets the probe
weight error of `calib.sensitivity` (its weights rounded on a 4-bit grid, per-channel max-abs steps)
while every other layer stays FP32. A row compares the KL that causes against the methods' model of
it, ½·Σ_c F_c·δw_cᵀHδw_c (H over the same crops), for F from `calibration.sensitivity = "diagonal"`
and from `"coherent"`, both measured on the same crops. A ratio near 1 is a currency the allocators
can spend across layers; the summary line takes the layers whose error alone stays in the
second-order regime (KL < 0.05).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ptq.api import prepare
from ptq.calib.sensitivity import by_channel, channel_fisher, probe_error
from ptq.ir import execute
from ptq.ir.floatops import conv_float, float_kernels, linear_float, run_float
from ptq.memory import reuse_freed_memory
from ptq.metrics import fidelity

SECOND_ORDER_KL = 0.05


def output_change_energy(graph, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per layer, E_{s,p}[δz_c²] of its probe error on its FP32 inputs: δw_cᵀHδw_c per channel."""
    probes = {op.name: probe_error(op.weight) for op in graph.weighted_ops()}
    out: dict[str, np.ndarray] = {}
    kernels = float_kernels(torch.float32)

    def weighted(op, xs):
        f = conv_float if op.kind == "conv" else linear_float
        dz = by_channel(op, f(op, xs[0], probes[op.name], None).double())
        out[op.name] = out.get(op.name, 0.0) + (dz * dz).mean(2).sum(0).numpy()
        return kernels[op.kind](op, xs)

    with torch.no_grad():
        for part in x.split(8):
            execute(graph, part, {**kernels, "conv": weighted, "linear": weighted})
    return {k: v / len(x) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="the calibration draw and the sampled labels' seed")
    ap.add_argument("--samples", type=int, default=32, help="calibration crops for F, H and the KL")
    args = ap.parse_args()
    reuse_freed_memory()
    prep = prepare("efficientnet_lite0", "samples", "w8a8", calib_size=args.samples, eval_size=0, seed=args.seed)
    graph = prep.graph
    x = prep.source.tensor().float()
    fisher = {kind: channel_fisher(graph, x.split(16), args.seed, coherent=kind == "coherent") for kind in ("diagonal", "coherent")}
    energy = output_change_energy(graph, x)
    fp32 = run_float(graph, x).numpy()
    ratios: dict[str, list[float]] = {"diagonal": [], "coherent": []}
    for op in graph.weighted_ops():
        w = op.weight
        op.weight = (torch.from_numpy(w).double() + probe_error(w).double()).float().numpy()
        try:
            kl = fidelity(fp32, run_float(graph, x).numpy())["kl"]
        finally:
            op.weight = w
        model = {kind: 0.5 * float((f[op.name] * energy[op.name]).sum()) for kind, f in fisher.items()}
        row = {"layer": op.name, "weights": int(w.size), "kl": kl,
               **{f"kl_over_{kind}": kl / m if m > 0 else None for kind, m in model.items()}}
        print(json.dumps(row), flush=True)
        if kl < SECOND_ORDER_KL and op.kind == "conv":
            for kind, m in model.items():
                if m > 0:
                    ratios[kind].append(kl / m)
    summary = {kind: {"convs": len(r), "min": min(r), "median": float(np.median(r)), "max": max(r)}
               for kind, r in ratios.items() if r}
    print(json.dumps({"seed": args.seed, "samples": args.samples, "measured_kl_over_model_convs": summary}), flush=True)


if __name__ == "__main__":
    main()
