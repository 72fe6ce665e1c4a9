"""Recipe variants on one calibration draw of EfficientNet-Lite0: the protocol of issue 19's targets.

    python -m benchmarks.draws --seed S ROW [ROW ...]

A ROW is a recipe followed by its overrides, as one argument: `"w4a8-learned rounding.bias_rate=0.01"`
(`KEY=VALUE` as `ptq quantize --set` takes them). The draw S picks both the 128 calibration crops
and the 256 held-out crops (`ptq.api.prepare(..., seed=S)`); consecutive rows whose statistics
take the same [calibration] keys (the recipe's own, e.g. `bitplane`'s coherent sensitivity on 128
samples, then --set) share one calibration, and each row is printed as a JSON line as soon as it ends (top-1 agreement %, KL, SQNR, mean weight
bits, whether it verified). The figures of a learned row do not depend on the thread count; run it
with `OMP_NUM_THREADS=1` to run two draws side by side on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import shlex

from ptq.api import prepare
from ptq.cli import parse_sets

from .variants import fidelity_row, statistics_keys

KEYS = ("mean_weight_bits", "top1_agreement", "kl", "sqnr_db", "verified", "seconds")


def parse_row(text: str) -> tuple[str, dict]:
    """`"RECIPE KEY=VALUE ..."` as (recipe, overrides)."""
    recipe, *sets = shlex.split(text)
    return recipe, parse_sets(sets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="the calibration and held-out draw")
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a [calibration] key the statistics of every row are collected with, e.g. calibration.grouped_positions=64")
    ap.add_argument("rows", nargs="+", metavar="ROW", help='a recipe and its overrides, e.g. "bitplane rounding.damp=0.02"')
    args = ap.parse_args()
    rows = [parse_row(r) for r in args.rows]
    cal = parse_sets(args.sets)
    if any(not k.startswith("calibration.") for k in cal):
        ap.error("--set takes [calibration] keys only (a row's own keys go in the row)")
    prep, prepared = None, None
    for recipe, over in rows:
        keys = statistics_keys(recipe, over, cal)
        if keys != prepared:  # the row's own [calibration] (`bitplane`'s coherent sensitivity), not w8a8's
            prep = None
            prep = prepare("efficientnet_lite0", "samples", "w8a8", calib_size=args.calib_size, eval_size=args.eval_size,
                           seed=args.seed, overrides=keys)
            prepared = keys
        row = fidelity_row(prep, recipe, recipe, over)
        print(json.dumps({"seed": args.seed, "recipe": recipe, "overrides": over, "calibration": keys,
                          "statistics_seconds": round(prep.calibration_seconds, 1), **{k: row[k] for k in KEYS}}), flush=True)


if __name__ == "__main__":
    main()
