"""Which mode bias correction's `auto` chooses on a few calibration samples against on all of them.

    python -m benchmarks.biaschoice [--model efficientnet_lite0] [--calib samples] [--seed S]
                                    [--weights random] [--choose 32] RECIPE[,RECIPE...]

`auto` compares its candidates (none, depthwise, all) on `bias_correction.choose_samples`
of the calibration samples, spread evenly over them, then measures the chosen mode alone on all
of them: where both choose the same mode, the manifest is the same bytes. For each recipe this
quantizes the method and manifest once, runs the comparison on the spread subset and on all
samples, and prints a JSON line: both choices, each candidate's calibration KL on each, and the
seconds of each comparison.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

from ptq.api import _head, prepare, stage_manifest, stage_method
from ptq.biascorrect import choose_and_correct, spread
from ptq.manifest import Manifest
from ptq.memory import reuse_freed_memory
from ptq.recipe import resolve

from .variants import prepared_calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", help="comma-separated recipe names")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--calib", default="samples", help="calibration data, e.g. samples:eval for the other photos")
    ap.add_argument("--seed", type=int, default=0, help="the calibration draw")
    ap.add_argument("--weights", help="weights of a torchvision model: a path, or 'random'")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--choose", type=int, default=32, help="samples of the spread subset")
    args = ap.parse_args()
    reuse_freed_memory()  # as the command line
    prep = prepare(args.model, args.calib, "w8a8", weights=args.weights, calib_size=args.calib_size,
                   eval_size=0, seed=args.seed)
    for recipe in args.recipes.split(","):
        r = resolve(recipe, prepared_calibration(prep))
        m = stage_manifest(prep, r, stage_method(prep.graph, prep.stats, r))
        x = _head(prep.source, r["bias_correction"]["samples"])
        row = {"model": args.model, "calib": args.calib, "seed": args.seed, "recipe": recipe}
        for label, n in (("subset", args.choose), ("all", len(x))):
            trial = Manifest(copy.deepcopy(m.data), dict(m.tensors))
            some = spread(x, n)
            t = time.perf_counter()
            info = choose_and_correct(prep.graph, trial, some, "auto")  # the comparison alone, on these samples
            row[label] = {"samples": len(some), "chosen": info["chosen"], "seconds": round(time.perf_counter() - t, 1),
                          "calibration_kl": {k: round(v, 6) for k, v in info["calibration_kl"].items()}}
        row["same"] = row["subset"]["chosen"] == row["all"]["chosen"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
