"""Multipoint benchmark: multipoint against uniform at equal and lower bits, and the paper's ablation.

    python -m benchmarks.multipoint [--models efficientnet_lite0,resnet18] [--calib-size 64] [--eval-size 256]

Rows per model, all through the integer simulator on held-out sample crops, fidelity vs FP32:
- uniform 4-bit (the shipped `w4a8`: first and last layer at 8 bits);
- uniform 4 / 5 bits with the layers the `multipoint` recipe keeps at 8 bits kept at 8 bits too, so
  the only difference from multipoint is where the extra bits go;
- multipoint as shipped (4-bit first point, 2-bit extra points ranked network-wide by Fisher-weighted
  output-error reduction, coefficients refitted), at uniform 5-bit's effective bits, without the
  coefficient refit, with the paper's construction (equal 4-bit points, largest error first, greedy
  coefficients), the same budget spent per layer, and spent on randomly chosen channels (the
  paper's ablation).
resnet18 runs with random weights unless torchvision weights are in the hub cache: its agreement
figures measure quantization noise against the same random FP32 network, not accuracy. The last
lines give quantize time over one FP32 pass of the calibration data for resnet50 (random weights).
"""
from __future__ import annotations

import time

import torch

import ptq

from .variants import FIDELITY, table_main

MP_PINS = ["first", "depthwise", "early:0.02"]  # the multipoint recipe's 8-bit layers


def uniform_with_pins(bits: int) -> dict:
    return {"description": f"uniform {bits}-bit weights; the multipoint recipe's 8-bit layers at 8 bits",
            "method": "uniform", "weights": {"bits": bits, "clip": "output"},
            "activations": {"bits": 8, "observer": "mse"}, "bias_correction": {"mode": "auto"},
            "overrides": [{"layers": MP_PINS, "weights": {"bits": 8}}]}


def variants() -> list[tuple[str, object, dict]]:
    paper = {"multipoint.extra_bits": 4, "multipoint.priority": "energy", "multipoint.coefficients": "greedy"}
    return [
        ("uniform w4a8 (first/last 8)", "w4a8", {}),
        ("uniform 4 (multipoint pins)", uniform_with_pins(4), {}),
        ("uniform 5 (multipoint pins)", uniform_with_pins(5), {}),
        ("multipoint (as shipped)", "multipoint", {}),
        ("multipoint at uniform 5's bits (budget 1.24)", "multipoint", {"multipoint.budget": 1.24}),
        ("multipoint, greedy coefficients (no refit)", "multipoint", {"multipoint.coefficients": "greedy"}),
        ("multipoint, paper's points (4-bit extras, error priority, greedy coefficients)", "multipoint", paper),
        ("multipoint (per-layer budget)", "multipoint", {"multipoint.budget_scope": "layer"}),
        ("multipoint (random channels)", "multipoint", {"multipoint.channel_choice": "random"}),
    ]


def resnet50_ratio(calib: int) -> dict:
    from ptq.api import as_source
    from ptq.models import load_model
    lm = load_model("resnet50", "random", 0, None)
    x = as_source("samples", lm.spec, calib, 0, "calib").tensor()
    with torch.no_grad():
        t = time.perf_counter()
        for xb in x.split(16):
            lm.module(xb)
        fp32 = time.perf_counter() - t
    out = {}
    for recipe in ("w4a8", "multipoint"):
        t = time.perf_counter()
        ptq.quantize("resnet50", x.numpy(), recipe, weights="random", calib_size=calib, eval_data=x[:16].numpy(), eval_size=16)
        out[recipe] = (time.perf_counter() - t) / fp32
    return out


def skip_arg(ap) -> None:
    ap.add_argument("--skip-resnet50", action="store_true")


def resnet50_rows(a, out: dict) -> None:
    if not a.skip_resnet50:
        out["resnet50_quantize_over_fp32_pass"] = r50 = resnet50_ratio(a.calib_size)
        print("\nresnet50 (random weights): quantize / one FP32 calibration pass = "
              + ", ".join(f"{k} {v:.1f}×" for k, v in r50.items()))


def main() -> None:
    table_main(__doc__, "efficientnet_lite0,resnet18", lambda prep, a: variants(),
               [("mean bits", lambda r: f"{r['mean_weight_bits']:.2f}"), ("top-5 agr. %", lambda r: f"{r['top5_agreement']:.1f}"),
                *FIDELITY],
               add_args=skip_arg, after=resnet50_rows)


if __name__ == "__main__":
    main()
