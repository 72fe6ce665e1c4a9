"""Foundation benchmark: EfficientNet-Lite0 fidelity (W8A8, W4A8) and resnet50 speed ratios.

    python -m benchmarks.foundation [--eval-size 256] [--calib-size 128] [--skip-resnet50] [--json FILE]

Fidelity is measured through the integer simulator on held-out sample crops (FP32 top-1 as the
label). Speed is quoted as ratios measured in the same run: quantize time / one FP32 pass over the
calibration data, and simulator time / FP32 forward time on the same batch.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

import ptq
from ptq.api import as_source


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lite0(recipe: str, calib_size: int, eval_size: int) -> dict:
    t0 = time.perf_counter()
    qm = ptq.quantize("efficientnet_lite0", "samples", recipe, calib_size=calib_size, eval_size=eval_size)
    secs = time.perf_counter() - t0
    f = qm.report["fidelity"]
    num = qm.manifest.data["verification"]["numeric"]
    return {"model": "efficientnet_lite0", "recipe": recipe, "mean_weight_bits": qm.report["mean_weight_bits"],
            "top1_agreement": f["top1_agreement"], "top5_agreement": f["top5_agreement"], "kl": f["kl"],
            "sqnr_db": f["sqnr_db"], "eval_samples": f["samples"], "sim_within_1lsb_min": num["min_share_within_1lsb"],
            "sim_vs_fakequant_top1": num["top1_agreement_sim_vs_reference"], "verified": num["ok"],
            "bias_correction": qm.manifest.data["bias_correction"].get("chosen", qm.manifest.data["bias_correction"]["mode"]),
            "seconds": secs}


def resnet50_speed(calib_size: int) -> dict:
    lm_kwargs = dict(weights="random", calib_size=calib_size, eval_size=16)
    from ptq.models import load_model
    lm = load_model("resnet50", "random")
    src = as_source("samples", lm.spec, calib_size, 0, "calib")
    x = torch.cat(list(src.batches(16)))
    with torch.no_grad():
        lm.module(x[:16])  # warm up
        t = time.perf_counter()
        for xb in x.split(16):
            lm.module(xb)
        fp32_pass = time.perf_counter() - t
    t = time.perf_counter()
    qm = ptq.quantize("resnet50", "samples", "w8a8", **lm_kwargs)
    quant_secs = time.perf_counter() - t
    batch = x[:16]
    with torch.no_grad():
        t = time.perf_counter()
        lm.module(batch)
        fwd = time.perf_counter() - t
    qm.simulate(batch[:2])  # warm up
    t = time.perf_counter()
    qm.simulate(batch)
    sim = time.perf_counter() - t
    return {"model": "resnet50 (random weights)", "calib_size": calib_size, "fp32_calibration_pass_s": fp32_pass,
            "quantize_s": quant_secs, "quantize_over_fp32_pass": quant_secs / fp32_pass,
            "simulator_over_fp32_forward": sim / fwd, "verified": qm.manifest.data["verification"]["numeric"]["ok"]
            and qm.manifest.data["verification"]["structural"]["ok"], "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--skip-resnet50", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = [lite0(r, a.calib_size, a.eval_size) for r in ("w8a8", "w4a8")]
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "lite0": rows}
    if not a.skip_resnet50:
        out["resnet50"] = resnet50_speed(a.calib_size)
    print("| model | recipe | mean bits | top-1 agr. % | top-5 agr. % | KL | SQNR dB | sim≈ref (min share ≤1 LSB) | sim vs ref top-1 % | bias corr. | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['recipe']} | {r['mean_weight_bits']:.2f} | {r['top1_agreement']:.1f} | {r['top5_agreement']:.1f} | "
              f"{r['kl']:.4f} | {r['sqnr_db']:.1f} | {r['sim_within_1lsb_min']:.5f} | {r['sim_vs_fakequant_top1']:.1f} | "
              f"{r['bias_correction']} | {r['seconds']:.0f} |")
    if "resnet50" in out:
        r = out["resnet50"]
        print(f"\nresnet50: quantize / FP32 calibration pass = {r['quantize_over_fp32_pass']:.1f}x, "
              f"simulator / FP32 forward = {r['simulator_over_fp32_forward']:.1f}x, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"verified {r['verified']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
