"""Which layers carry a recipe's KL on EfficientNet-Lite0: each layer's quantized weights alone.

    python -m benchmarks.layer_kl --seed S [--eval-size 128] "RECIPE KEY=VALUE ..."

The recipe is quantized on draw S (as `benchmarks.draws`). Then the captured FP32 graph runs on the
held-out crops of that draw with one layer at a time given its dequantized weights and integer bias
(activations stay FP32), and each row prints that layer's width, its weight count and the KL and
top-1 agreement against the FP32 model. A layer whose KL is out of line with its width is where a
method went wrong (session 41 found a depthwise channel the calibration photos never open this way).
The first line is every layer's weights at once, beside the integer simulator's figures.

With `--calibration`, each row also gives the layer's KL on the first `--eval-size` calibration
crops. The ratio of the two says where the calibration photos under-state a layer's cost on other
photos: on Lite0 `bitplane-4.5` the late wide layers carry 1.3–3.5× their calibration KL on the
held-out photos, the early layers about 1× (BENCHMARKS.md, session 43).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from ptq.api import as_source, prepare, quantize_prepared
from ptq.ir.floatops import run_float
from ptq.memory import reuse_freed_memory
from ptq.metrics import fidelity
from ptq.runtime.reference import dequantized_bias, dequantized_weight

from .draws import parse_row
from .variants import prepared_calibration, statistics_keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="the calibration and held-out draw")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=128, help="held-out crops each layer's row runs on")
    ap.add_argument("--calibration", action="store_true", help="also each layer's KL on the calibration crops")
    ap.add_argument("row", help='a recipe and its overrides, e.g. "bitplane-4.5 rounding.damp=0.02"')
    args = ap.parse_args()
    reuse_freed_memory()
    recipe, over = parse_row(args.row)
    prep = prepare("efficientnet_lite0", "samples", "w8a8", calib_size=args.calib_size, eval_size=args.eval_size,
                   seed=args.seed, overrides=statistics_keys(recipe, over, {}))  # as `benchmarks.draws` prepares, so the rows are its manifests
    qm = quantize_prepared(prep, recipe, {**over, **prepared_calibration(prep)})
    m, graph = qm.manifest, prep.graph
    sets = {"": as_source("samples:eval", m.data["model"], args.eval_size, args.seed, "eval").tensor()}
    if args.calibration:
        sets["calibration_"] = prep.source.tensor()[:args.eval_size]
    fp32 = {k: run_float(graph, x).numpy() for k, x in sets.items()}
    records = {r["name"]: r for r in m.weighted_ops()}
    layers = graph.weighted_ops()
    floats = {op.name: (op.weight, op.bias) for op in layers}
    quantized = {op.name: (dequantized_weight(m, records[op.name], torch.float32).numpy().reshape(op.weight.shape),
                           dequantized_bias(m, records[op.name]).astype(np.float32)) for op in layers}

    def with_quantized(names: set[str]) -> dict:
        """KL and top-1 agreement on each set of crops ("calibration_" keys for the calibration ones)."""
        for op in layers:
            op.weight, op.bias = (quantized if op.name in names else floats)[op.name]
        try:
            out = {}
            for k, x in sets.items():
                f = fidelity(fp32[k], run_float(graph, x).numpy())
                out.update({k + "kl": f["kl"], k + "top1_agreement": f["top1_agreement"]})
            return out
        finally:
            for op in layers:
                op.weight, op.bias = floats[op.name]

    sim = qm.report["fidelity"]
    print(json.dumps({"seed": args.seed, "recipe": recipe, "overrides": over, "layer": "every layer",
                      **with_quantized(set(records)), "simulator_kl": sim["kl"] if sim else None}), flush=True)
    for op in layers:
        print(json.dumps({"layer": op.name, "bits": records[op.name]["weight"].get("bits"), "weights": int(op.weight.size),
                          **with_quantized({op.name})}), flush=True)


if __name__ == "__main__":
    main()
