"""Statistics of one process against 2 gloo ranks (`workers=2`) on EfficientNet-Lite0.

    python -m benchmarks.distributed [--calib-size 64]

Collects the calibration statistics (`ptq.api.prepare`, recipe w8a8) once in this process with all
its torch threads and once on 2 ranks with one share each, and prints each kind's largest relative
difference, whether it is the same bits, and the times. w8a8 does not read the Fisher sensitivity,
so neither run measures it (tests/test_distributed.py compares it on a recipe that does).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ptq.api import prepare


def relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-size", type=int, default=64)
    args = ap.parse_args()
    kw = dict(calib_size=args.calib_size, eval_size=0)
    t = time.perf_counter()
    one = prepare("efficientnet_lite0", "samples", "w8a8", **kw)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    two = prepare("efficientnet_lite0", "samples", "w8a8", workers=2, **kw)
    t2 = time.perf_counter() - t
    a, b = two.stats, one.stats
    pairs = {"ranges": [(np.array(a.ranges[k]), np.array(v)) for k, v in b.ranges.items()],
             "histograms": [(a.histograms[k].counts, v.counts) for k, v in b.histograms.items()],
             "H": [(a.layer_inputs[k].xx, v.xx) for k, v in b.layer_inputs.items()],
             "mean": [(a.layer_inputs[k].x, v.x) for k, v in b.layer_inputs.items()]}
    print(f"torch threads {torch.get_num_threads()}; prepare: 1 process {t1:.1f} s, 2 ranks {t2:.1f} s; "
          f"statistics stage: 1 process {one.calibration_seconds:.1f} s, 2 ranks {two.calibration_seconds:.1f} s")
    for kind, ab in pairs.items():
        print(f"{kind}: max relative difference {max(relative(x, y) for x, y in ab):.3g}, "
              f"same bits {all(np.array_equal(x, y) for x, y in ab)}")


if __name__ == "__main__":
    main()
