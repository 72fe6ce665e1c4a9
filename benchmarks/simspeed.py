"""Simulator speed: the integer simulator and onnxruntime's integer twin against the FP32 forward pass.

    python -m benchmarks.simspeed [--models efficientnet_lite0,resnet18,resnet50] [--batch 16] [--repeats 3]

Each model is quantized with `w8a8` (16 calibration crops; resnets with random weights: speed only).
On one batch of held-out crops, with one thread for every engine, the best of `repeats` timings of:
the FP32 PyTorch forward, `QuantizedModel.simulate` (integer simulator), onnxruntime on the integer
twin (`--format int`, which must equal the simulator bit for bit — checked) and on the QDQ twin.
Reported as ratios to the FP32 forward measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import ptq
from ptq.api import as_source
from ptq.export import onnxruntime_runner


def best_time(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(model: str, batch: int, repeats: int) -> dict:
    weights = None if model == "efficientnet_lite0" else "random"
    qm = ptq.quantize(model, "samples", "w8a8", weights=weights, calib_size=16, eval_size=8)
    x = as_source("samples:eval", qm.manifest.data["model"], batch, 0, "eval").tensor()
    fp32 = qm.fp32_model().eval()
    int_twin = onnxruntime_runner(qm.manifest, fmt="int")
    qdq = onnxruntime_runner(qm.manifest, fmt="qdq")
    identical = bool(np.array_equal(int_twin(x), qm.simulate(x)))
    with torch.no_grad():
        t_fp = best_time(lambda: fp32(x), repeats)
    return {"model": model if weights is None else f"{model} (random)", "batch": batch,
            "simulator_over_fp32": best_time(lambda: qm.simulate(x), repeats) / t_fp,
            "ort_int_twin_over_fp32": best_time(lambda: int_twin(x), repeats) / t_fp,
            "ort_qdq_over_fp32": best_time(lambda: qdq(x), repeats) / t_fp,
            "int_twin_identical": identical}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="efficientnet_lite0,resnet18,resnet50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| model | batch | simulator / FP32 forward | onnxruntime int twin / FP32 | onnxruntime QDQ / FP32 | int twin = simulator |")
    print("|---|---|---|---|---|---|")
    rows = []
    for m in a.models.split(","):
        r = measure(m, a.batch, a.repeats)
        rows.append(r)
        print(f"| {r['model']} | {r['batch']} | {r['simulator_over_fp32']:.2f}× | {r['ort_int_twin_over_fp32']:.2f}× | "
              f"{r['ort_qdq_over_fp32']:.2f}× | {'identical' if r['int_twin_identical'] else 'DIFFERS'} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
