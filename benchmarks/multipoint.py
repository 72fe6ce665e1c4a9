"""Multipoint benchmark: multipoint against uniform at equal and lower bits, and the paper's ablation.

    python -m benchmarks.multipoint [--models efficientnet_lite0,resnet18] [--calib-size 64] [--eval-size 256]

Rows per model, all through the integer simulator on held-out sample crops, fidelity vs FP32:
- uniform 4-bit (the shipped `w4a8`: first and last layer at 8 bits);
- uniform 4 / 5 bits with the layers the `multipoint` recipe keeps at 8 bits kept at 8 bits too, so
  the only difference from multipoint is where the extra bits go;
- multipoint as shipped (extra points to the channels with the largest output error, network-wide),
  the same budget spent per layer, and spent on randomly chosen channels (the paper's ablation);
  and with 16-bit instead of the recipe's 12-bit logits.
resnet18 runs with random weights unless torchvision weights are in the hub cache: its agreement
figures measure quantization noise against the same random FP32 network, not accuracy. The last
lines give quantize time over one FP32 pass of the calibration data for resnet50 (random weights).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import ptq

from .variants import fidelity_row, prepare_model

MP_PINS = ["first", "*_depthwise_conv", "_blocks.[0-5].*"]  # the multipoint recipe's 8-bit layers


def uniform_with_pins(bits: int) -> dict:
    return {"description": f"uniform {bits}-bit weights; the multipoint recipe's 8-bit layers at 8 bits",
            "method": "uniform", "weights": {"bits": bits, "clip": "output"},
            "activations": {"bits": 8, "observer": "mse"}, "bias_correction": {"mode": "auto"},
            "overrides": [{"layers": MP_PINS, "weights": {"bits": 8}}]}


def variants() -> list[tuple[str, object, dict]]:
    return [
        ("uniform w4a8 (first/last 8)", "w4a8", {}),
        ("uniform 4 (multipoint pins)", uniform_with_pins(4), {}),
        ("uniform 5 (multipoint pins)", uniform_with_pins(5), {}),
        ("multipoint (global, by error)", "multipoint", {}),
        ("multipoint (per-layer budget)", "multipoint", {"multipoint.budget_scope": "layer"}),
        ("multipoint (random channels)", "multipoint", {"multipoint.channel_choice": "random"}),
        ("multipoint (16-bit logits)", "multipoint", {"activations.output_bits": 16}),
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_lite0,resnet18")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--skip-resnet50", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    print("| model | variant | mean bits | top-1 agr. % | top-5 agr. % | KL | SQNR dB | verified (sim vs ref top-1 %) |")
    print("|---|---|---|---|---|---|---|---|")
    for m in a.models.split(","):
        prep = prepare_model(m, a.calib_size, a.eval_size)
        for label, recipe, over in variants():
            r = fidelity_row(prep, label, recipe, over)
            rows.append(r)
            print(f"| {m} | {label} | {r['mean_weight_bits']:.2f} | {r['top1_agreement']:.1f} | {r['top5_agreement']:.1f} | "
                  f"{r['kl']:.4f} | {r['sqnr_db']:.1f} | {r['verified']} ({r['sim_vs_reference_top1']:.1f}) |", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(), "rows": rows}
    if not a.skip_resnet50:
        out["resnet50_quantize_over_fp32_pass"] = r50 = resnet50_ratio(a.calib_size)
        print("\nresnet50 (random weights): quantize / one FP32 calibration pass = "
              + ", ".join(f"{k} {v:.1f}×" for k, v in r50.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
