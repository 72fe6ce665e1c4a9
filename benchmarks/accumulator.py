"""Accumulator benchmark: P-bit accumulators, allocator against the naive single width, overflows.

    python -m benchmarks.accumulator [--models efficientnet_lite0,resnet18] [--bits 16,14,12]
                                     [--calib-size 64] [--eval-size 128]

For each model and accumulator width P: the `acc16` recipe with `accumulator.bits = P` (the integer
program over per-layer weight and input widths, L1-fitted weights) and the naive baseline (one
(weight bits, input bits) pair for every layer, the widest whose plain rounding fits P everywhere).
Fidelity vs FP32 through the integer simulator on held-out crops; overflow counts of the simulator
in wrap and saturate mode at P bits on the calibration and the held-out data; whether every
channel meets the data-free bound. resnet18 runs with random weights (no pretrained weights offline).
The last line gives the allocator's solve time on resnet50 (random weights).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import ptq
from ptq.api import as_source

from .variants import fidelity_row, prepare_model


def overflows(qm, x: torch.Tensor, p: int) -> dict[str, int]:
    """Overflow counts per accumulator mode at width p, as `ptq simulate` counts them."""
    return {mode: qm.verify(x, None, accumulator=mode, accumulator_bits=p)["overflows"] for mode in ("wrap", "saturate")}


def row(prep, p: int, naive: bool, calib: int, evals: int) -> dict:
    over = {"accumulator.bits": p, "allocator.min_input_bits": 3 if p <= 12 else 4}
    if naive:
        over["allocator.mode"] = "naive"
    variant = "naive" if naive else "allocator"

    def accumulators(qm) -> dict:
        m = qm.manifest
        spec = m.data["model"]
        xs = torch.cat([as_source("samples", spec, calib, 0, "calib").tensor(), as_source("samples:eval", spec, evals, 0, "eval").tensor()])
        ov = overflows(qm, xs, p)
        ops = m.weighted_ops()
        info = m.data.get("method_info", {})
        alloc = info.get("allocator") if isinstance(info.get("allocator"), dict) else None
        return {"P": p, "mean_input_bits": float(np.mean([m.encoding(o["inputs"][0])["bits"] for o in ops])),
                "overflows_wrap": ov["wrap"], "overflows_saturate": ov["saturate"],
                "data_free_ok": all(o["accumulator"]["data_free_bits"] <= p for o in ops),
                "solver": alloc["solver"] if alloc else "naive", "solve_s": qm.report.get("allocator_seconds"),
                "naive_pair": [info.get("weight_bits"), info.get("input_bits")] if naive else None}

    try:
        return fidelity_row(prep, variant, "acc16", over, accumulators)
    except ptq.PtqError as exc:
        return {"model": prep.model.spec["name"], "P": p, "variant": variant, "error": str(exc)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="efficientnet_lite0,resnet18")
    ap.add_argument("--bits", default="16,14,12")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=128)
    ap.add_argument("--skip-resnet50", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    print("| model | P | variant | mean weight bits | mean input bits | top-1 agr. % | KL | SQNR dB | overflows wrap / saturate (calib + held-out) | data-free bound, every channel | solver (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        prep = prepare_model(model, a.calib_size, a.eval_size)
        for p in [int(b) for b in a.bits.split(",")]:
            for naive in (False, True):
                r = row(prep, p, naive, a.calib_size, a.eval_size)
                rows.append(r)
                if "error" in r:
                    print(f"| {model} | {p} | {r['variant']} | — | — | — | — | — | — | — | {r['error']} |", flush=True)
                    continue
                extra = f" ({r['naive_pair'][0]}/{r['naive_pair'][1]})" if naive else ""
                solver = f"{r['solver']} ({r['solve_s']:.2f})" if r["solve_s"] is not None else "—"
                print(f"| {model} | {p} | {r['variant']}{extra} | {r['mean_weight_bits']:.2f} | {r['mean_input_bits']:.2f} | "
                      f"{r['top1_agreement']:.1f} | {r['kl']:.4f} | {r['sqnr_db']:.1f} | {r['overflows_wrap']} / {r['overflows_saturate']} | "
                      f"{r['data_free_ok']} | {solver} |", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "rows": rows}
    if not a.skip_resnet50:
        qm = ptq.quantize("resnet50", "samples", "acc16", weights="random", calib_size=16, eval_size=8)
        out["resnet50_allocator"] = {**qm.manifest.data["method_info"]["allocator"], "seconds": qm.report["allocator_seconds"]}
        print(f"\nresnet50 (random weights), acc16: allocator {out['resnet50_allocator']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
