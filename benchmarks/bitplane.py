"""Bit-plane benchmark: calibrated plane allocation against uniform and the data-free variant at equal mean bits.

    python -m benchmarks.bitplane [--models efficientnet_lite0,resnet18] [--bits 4,3] [--calib-size 64] [--eval-size 256]

Rows per model and mean bit budget b, all through the integer simulator on held-out sample crops,
fidelity vs FP32: uniform b bits in every layer (the same mean), the shipped uniform `w4a8` (first and
last layer at 8 bits, so a higher mean) for reference, `bitplane` at mean b (plane costs from the
layer outputs on calibration data, Fisher-weighted) and its data-free variant (plane costs from the
weights alone). resnet18 runs with random weights unless torchvision weights are in the hub cache.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from .variants import fidelity_row, prepare_model


def uniform_everywhere(bits: int) -> dict:
    return {"description": f"uniform {bits}-bit weights in every layer", "method": "uniform",
            "weights": {"bits": bits, "clip": "output"}, "activations": {"bits": 8, "observer": "mse"},
            "bias_correction": {"mode": "auto"}}


def variants(bits: list[int]) -> list[tuple[str, object, dict]]:
    out = [("uniform w4a8 (first/last 8)", "w4a8", {})]
    for b in bits:
        out += [(f"uniform {b} everywhere", uniform_everywhere(b), {}),
                (f"bitplane mean {b} (calibrated)", "bitplane", {"bitplane.mean_bits": float(b)}),
                (f"bitplane mean {b} (data-free)", "bitplane", {"bitplane.mean_bits": float(b), "bitplane.error": "weight"})]
    return out


def planes(qm) -> dict:
    return {"slice2_sparsity": qm.manifest.data.get("method_info", {}).get("slice2_sparsity")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_lite0,resnet18")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    print("| model | variant | mean bits | compression | top-1 agr. % | KL | SQNR dB | 2-bit slice sparsity % | verified |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in a.models.split(","):
        prep = prepare_model(m, a.calib_size, a.eval_size)
        for label, recipe, over in variants([int(b) for b in a.bits.split(",")]):
            r = fidelity_row(prep, label, recipe, over, planes)
            rows.append(r)
            sp = "-" if r["slice2_sparsity"] is None else f"{100 * r['slice2_sparsity']:.1f}"
            print(f"| {m} | {label} | {r['mean_weight_bits']:.2f} | {32 / r['mean_weight_bits']:.1f}x | {r['top1_agreement']:.1f} | "
                  f"{r['kl']:.4f} | {r['sqnr_db']:.1f} | {sp} | {r['verified']} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(), "rows": rows},
                      f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
