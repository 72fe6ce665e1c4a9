"""Rounding benchmark: every shipped recipe with each rounding of the engine (nearest, feedback, learned).

    python -m benchmarks.rounding [--models efficientnet_lite0] [--recipes w4a8,...] [--roundings nearest,feedback]
                                  [--calib-size 128] [--eval-size 256] [--json FILE]

One calibration (capture + statistics) per model serves every row; each row is one quantize through
the integer simulator, fidelity vs FP32 on held-out sample crops. Time is a ratio measured in the
same process: the method stage (the recipe's method plus the rounding engine) over one FP32 pass of
the model over the calibration samples (batch 16), and the same for the whole quantize call
(method, manifest, bias correction, verification, evaluation). "bias correction" is what the
recipe's `auto` mode kept after that rounding (none, depthwise or all, by calibration KL):
rounding first, then the correction that measures best on top of it.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ptq.recipe import builtin_names

from .variants import FIDELITY, table_main

_FP32_PASS: dict[str, float] = {}


def fp32_pass_seconds(prep) -> float:
    """Wall seconds of one FP32 forward pass of the model over the calibration samples (cached per model)."""
    name = prep.model.spec["name"]
    if name not in _FP32_PASS:
        t = time.perf_counter()
        with torch.no_grad():
            for xb in prep.source.batches(16):
                prep.model.module(xb)
        _FP32_PASS[name] = time.perf_counter() - t
    return _FP32_PASS[name]


def variants(prep, a):
    fp32_pass_seconds(prep)
    recipes = builtin_names() if a.recipes == "all" else a.recipes.split(",")
    for recipe in recipes:
        for rounding in a.roundings.split(","):
            name = Path(recipe).stem if recipe.endswith(".toml") else recipe  # "bitplane-4.5" is a name, not a file
            yield f"{name} {rounding}", recipe, {"weights.rounding": rounding}


def timing(qm) -> dict:
    base = _FP32_PASS[qm.manifest.data["model"]["name"]]
    stages = qm.report["stage_seconds"]
    total = sum(v for k, v in stages.items() if k in ("method", "manifest", "bias_correction", "verification", "evaluation"))
    bc = qm.manifest.data["bias_correction"]
    return {"bias_correction": bc.get("chosen", bc["mode"]), "method_seconds": stages["method"], "fp32_pass_seconds": base,
            "method_over_fp32_pass": stages["method"] / base, "quantize_over_fp32_pass": total / base}


def args(ap) -> None:
    ap.add_argument("--recipes", default="all", help="comma-separated built-in recipe names or recipe files "
                    "(benchmarks/recipes/ holds the tuned variants), or 'all'")
    ap.add_argument("--roundings", default="nearest,feedback")


def main() -> None:
    table_main(__doc__, "efficientnet_lite0", variants,
               [("mean bits", lambda r: f"{r['mean_weight_bits']:.2f}"), *FIDELITY,
                ("bias correction", lambda r: r["bias_correction"]),
                ("method / FP32 pass", lambda r: f"{r['method_over_fp32_pass']:.2f}"),
                ("quantize / FP32 pass", lambda r: f"{r['quantize_over_fp32_pass']:.1f}")],
               extra=timing, add_args=args)


if __name__ == "__main__":
    main()
