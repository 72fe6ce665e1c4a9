"""Quantize time per stage as ratios to one FP32 pass over the same calibration data, same process.

    python -m benchmarks.speed [--models digits,efficientnet_lite0] [--recipes w8a8,w4a8]
                               [--calib-size 64] [--eval-size 64] [--weights random] [--json FILE]

The machine is shared, so absolute seconds mean little: each row divides `report.json`'s
`stage_seconds` by the wall time of one FP32 forward pass (torch, batches of the recipe's
calibration batch size, after a warm-up batch) over the calibration tensors of that run, the
faster of one measured before the quantize and one after it. Each row's process tunes glibc's
allocator as `ptq`'s command line does (`ptq.memory.reuse_freed_memory`), which speeds the FP32 pass
more than ptq (Lite0 at batch 16: 2.0–2.9 s against 3.9–6.4 s; BENCHMARKS.md, session 29): the
ratios are to that pass. A second figure divides the quantize time by the same FP32 pass in a fresh
process with glibc's defaults (best of three after a warm-up), what a user's own PyTorch script
pays. The digits CNN is trained once (deterministic); named models (Lite0, a torchvision name such as vit_b_16 with
`--weights random`) calibrate on the bundled sample crops. Each row runs in a process of its own,
so its peak RSS is that recipe's high-water mark, not the largest of the rows before it; the JSON
file is rewritten as each row lands.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import ptq
from ptq.api import as_source
from ptq.memory import reuse_freed_memory
from ptq.recipe import parse_value, resolve

STAGES = ("load_and_capture", "statistics", "method", "manifest", "bias_correction", "verification", "evaluation")


def fp32_pass_seconds(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    """Wall seconds of one FP32 forward over `x` in batches of `batch` (best of three, after a warm-up)."""
    with torch.no_grad():
        model(x[:batch])
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for xb in x.split(batch):
                model(xb)
            best = min(best, time.perf_counter() - t)
    return best


def _model_and_data(model_name: str, calib_size: int, eval_size: int, weights: str | None):
    """(FP32 module, its calibration tensor, what `ptq.quantize` is given: model, calib, keywords)."""
    if model_name == "digits":
        from benchmarks.digits import digits_data, train
        xtr, _, xte, _ = digits_data()
        module = train()
        calib, x = xtr[:calib_size], torch.from_numpy(xtr[:calib_size])
        kw = {"eval_data": xte[:max(eval_size, 1)]}
        target: object = module
    else:
        qm_spec = ptq.api.load_model(model_name, weights, 0)
        module = qm_spec.module.eval()
        x = as_source("samples", qm_spec.spec, calib_size, 0, "calib").tensor()
        calib, kw, target = "samples", {"weights": weights}, model_name
    return module, x, (target, calib, kw)


def default_allocator_fp32(model_name: str, calib_size: int, batch: int, weights: str | None) -> float:
    """One FP32 pass (`fp32_pass_seconds`) with glibc's default allocator: run in a fresh process."""
    module, x, _ = _model_and_data(model_name, calib_size, 1, weights)
    return fp32_pass_seconds(module, x, batch)


def row(model_name: str, recipe: str, calib_size: int, eval_size: int, extra: dict, weights: str | None = None) -> dict:
    """One quantize run, with the allocator as the command line sets it, and its stage ratios to the
    FP32 pass over its calibration tensors in the same process."""
    tuned = reuse_freed_memory()
    batch = resolve(recipe)["calibration"]["batch_size"]
    module, x, (target, calib, kw) = _model_and_data(model_name, calib_size, eval_size, weights)
    cold = fp32_pass_seconds(module, x, batch)
    t = time.perf_counter()
    qm = ptq.quantize(target, calib, recipe, calib_size=calib_size, eval_size=eval_size, **kw, **extra)
    total = time.perf_counter() - t
    warm = fp32_pass_seconds(module, x, batch)
    fp32 = min(cold, warm)
    stages = qm.report["stage_seconds"]
    return {"model": model_name + (f" ({weights} weights)" if weights else ""), "recipe": recipe,
            "calib_size": calib_size, "eval_size": eval_size,
            "allocator_tuned": tuned, "batch": batch,
            "fp32_pass_s": fp32, "fp32_pass_before_s": cold, "fp32_pass_after_s": warm, "quantize_s": total,
            "total_over_fp32": total / fp32,
            "stages_over_fp32": {k: stages[k] / fp32 for k in STAGES if k in stages},
            "verified": qm.report["verification"]["verified"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def isolated(fn, *args):
    """fn(*args) in a fresh process (spawned: no state, threads, allocator settings or freed pages
    inherited from earlier rows)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def isolated_row(model_name: str, recipe: str, calib_size: int, eval_size: int, extra: dict,
                 weights: str | None = None) -> dict:
    """`row` in a fresh process, then the same FP32 pass in another with glibc's default allocator."""
    r = isolated(row, model_name, recipe, calib_size, eval_size, extra, weights)
    r["fp32_pass_default_allocator_s"] = isolated(default_allocator_fp32, model_name, calib_size, r["batch"], weights)
    r["total_over_fp32_default_allocator"] = r["quantize_s"] / r["fp32_pass_default_allocator_s"]
    return r


def table(rows: list[dict]) -> str:
    head = ("| model | recipe | total | total / FP32 pass, default allocator | "
            + " | ".join(s.replace("_", " ") for s in STAGES) + " | verified | peak RSS |")
    lines = [head, "|" + "---|" * (len(STAGES) + 6)]
    for r in rows:
        cells = [f"{r['stages_over_fp32'][s]:.2f}" if s in r["stages_over_fp32"] else "–" for s in STAGES]
        lines.append(f"| {r['model']} | {r['recipe']} | {r['total_over_fp32']:.2f} | "
                     f"{r['total_over_fp32_default_allocator']:.2f} | " + " | ".join(cells)
                     + f" | {'yes' if r['verified'] else 'NO'} | {r['peak_rss_mb'] / 1024:.1f} GB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits,efficientnet_lite0")
    ap.add_argument("--recipes", default="w8a8")
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--weights", help="weights of the named models: a path, or 'random' (e.g. vit_b_16 for speed)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra quantize() keyword, e.g. verify=full")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    extra = {k: parse_value(v) for k, v in (s.split("=", 1) for s in a.set)}  # as a recipe file or --set reads it
    print(f"ratios to one FP32 pass over the calibration data ({a.calib_size} samples; eval {a.eval_size})")
    print(table([]), flush=True)
    rows = []
    for m in a.models.split(","):
        for r in a.recipes.split(","):  # each row printed as it lands: a long run shows its progress
            rows.append(isolated_row(m, r, a.calib_size, a.eval_size, extra, a.weights))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(rows, f, indent=1, sort_keys=True)
                    f.write("\n")


if __name__ == "__main__":
    main()
