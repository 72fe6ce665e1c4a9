"""Which layers carry a recipe's KL on EfficientNet-Lite0: each layer's quantized weights alone.

    python -m benchmarks.layer_kl --seed S [--eval-size 128] "RECIPE KEY=VALUE ..."

The recipe is quantized on draw S (as `benchmarks.draws`). Then the captured FP32 graph runs on the
held-out crops of that draw with one layer at a time given its dequantized weights and integer bias
(activations stay FP32), and each row prints that layer's width, its weight count and the KL and
top-1 agreement against the FP32 model. A layer whose KL is out of line with its width is where a
method went wrong (session 41 found a depthwise channel the calibration photos never open this way).
The first line is every layer's weights at once, beside the integer simulator's figures.
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
    ap.add_argument("row", help='a recipe and its overrides, e.g. "bitplane-4.5 rounding.damp=0.02"')
    args = ap.parse_args()
    reuse_freed_memory()
    recipe, over = parse_row(args.row)
    prep = prepare("efficientnet_lite0", "samples", "w8a8", calib_size=args.calib_size, eval_size=args.eval_size,
                   seed=args.seed, overrides=statistics_keys(recipe, over, {}))  # as `benchmarks.draws` prepares, so the rows are its manifests
    qm = quantize_prepared(prep, recipe, {**over, **prepared_calibration(prep)})
    m, graph = qm.manifest, prep.graph
    x = as_source("samples:eval", m.data["model"], args.eval_size, args.seed, "eval").tensor()
    fp32 = run_float(graph, x).numpy()
    records = {r["name"]: r for r in m.weighted_ops()}
    layers = graph.weighted_ops()
    floats = {op.name: (op.weight, op.bias) for op in layers}
    quantized = {op.name: (dequantized_weight(m, records[op.name], torch.float32).numpy().reshape(op.weight.shape),
                           dequantized_bias(m, records[op.name]).astype(np.float32)) for op in layers}

    def with_quantized(names: set[str]) -> dict:
        for op in layers:
            op.weight, op.bias = (quantized if op.name in names else floats)[op.name]
        try:
            return fidelity(fp32, run_float(graph, x).numpy())
        finally:
            for op in layers:
                op.weight, op.bias = floats[op.name]

    every = with_quantized(set(records))
    sim = qm.report["fidelity"]
    print(json.dumps({"seed": args.seed, "recipe": recipe, "overrides": over, "layer": "every layer",
                      "kl": every["kl"], "top1_agreement": every["top1_agreement"],
                      "simulator_kl": sim["kl"] if sim else None}), flush=True)
    for op in layers:
        f = with_quantized({op.name})
        print(json.dumps({"layer": op.name, "bits": records[op.name]["weight"].get("bits"), "weights": int(op.weight.size),
                          "kl": f["kl"], "top1_agreement": f["top1_agreement"]}), flush=True)


if __name__ == "__main__":
    main()
