"""What the command line's allocator setting (`ptq.memory.reuse_freed_memory`) changes: single-threaded
elementwise ops on one mini-batch of Lite0's largest maps, and whole quantize runs, each in a fresh
process with glibc's defaults and with the setting, alternating.

    python -m benchmarks.allocator [--recipe w8a8] [--runs 2] [--calib-size 128] [--eval-size 64]
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from benchmarks.speed import isolated
from ptq.memory import reuse_freed_memory


def _set(tuned: bool) -> None:
    """The command line's allocator setting in this process, or glibc's defaults left as they are."""
    applied = reuse_freed_memory() if tuned else False
    assert applied == tuned, "glibc's allocator could not be set (another C library, or MALLOC_* set)"


def ops_ms(tuned: bool) -> dict[str, float]:
    """Milliseconds per op (best of 10) on 8 × 96 × 112 × 112 values, one thread."""
    _set(tuned)
    torch.set_num_threads(1)
    codes = torch.randint(0, 256, (8, 96, 112, 112), dtype=torch.uint8)
    x = codes.float()
    into = torch.empty_like(x)
    ops = {"clone (a new block)": x.clone, "copy_ into an existing block": lambda: into.copy_(x),
           "uint8 → float32": lambda: codes.to(torch.float32), "torch.div": lambda: torch.div(x, 0.02),
           "torch.sub": lambda: torch.sub(x, 3), "float32 → uint8, torch": lambda: x.to(torch.uint8),
           "float32 → uint8, numpy": lambda: x.numpy().astype(np.uint8)}
    out = {}
    for name, op in ops.items():
        op()
        best = float("inf")
        for _ in range(10):
            t = time.perf_counter()
            op()
            best = min(best, time.perf_counter() - t)
        out[name] = best * 1e3
    return out


def quantize_s(tuned: bool, recipe: str, calib_size: int, eval_size: int) -> dict:
    """One Lite0 quantize: whole seconds, bias correction seconds, peak RSS GiB."""
    _set(tuned)
    import ptq
    t = time.perf_counter()
    qm = ptq.quantize("efficientnet_lite0", "samples", recipe, calib_size=calib_size, eval_size=eval_size)
    return {"s": time.perf_counter() - t, "bias_correction_s": qm.report["stage_seconds"]["bias_correction"],
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=64)
    a = ap.parse_args()
    default, tuned = isolated(ops_ms, False), isolated(ops_ms, True)
    print("| op, 8×96×112×112, one thread | glibc defaults ms | the command line's allocator ms |\n|---|---|---|")
    for name in default:
        print(f"| {name} | {default[name]:.1f} | {tuned[name]:.1f} |")
    print(f"\n| Lite0 `{a.recipe}` | whole quantize s | bias correction s | peak RSS GiB |\n|---|---|---|---|", flush=True)
    for run in range(a.runs):
        for setting in (False, True):
            r = isolated(quantize_s, setting, a.recipe, a.calib_size, a.eval_size)
            print(f"| run {run + 1}, {'the command line' if setting else 'glibc defaults'} | {r['s']:.1f} | "
                  f"{r['bias_correction_s']:.1f} | {r['peak_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
