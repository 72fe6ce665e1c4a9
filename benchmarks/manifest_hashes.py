"""sha256 of manifest.json and tensors.safetensors for every shipped recipe, on the digits CNN and
EfficientNet-Lite0: the check that a refactoring changed no manifest byte.

    OMP_NUM_THREADS=1 python -m benchmarks.manifest_hashes OUT_DIR [--recipes a,b] [--models digits] [--json FILE]

Run it on two checkouts (e.g. `git worktree add /tmp/old REV` and `PYTHONPATH=/tmp/old`) and compare
the JSON files. Lite0 uses 32 bundled calibration crops; the digits CNN is trained once per run
(deterministic for its seed).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import ptq
from ptq.recipe import builtin_names
from benchmarks.digits import digits_data, train

FILES = ("manifest.json", "tensors.safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--recipes", help="comma-separated (default: every recipe in recipes/)")
    ap.add_argument("--models", default="digits,efficientnet_lite0", help="comma-separated: digits, efficientnet_lite0")
    ap.add_argument("--json", type=Path, help="write {model/recipe: {file: sha256}} here (default OUT/hashes.json)")
    a = ap.parse_args()
    recipes = a.recipes.split(",") if a.recipes else builtin_names()
    xtr, _, xte, _ = digits_data()
    digits = train()
    res = {}
    for model in a.models.split(","):
        for r in recipes:
            t0 = time.perf_counter()
            if model == "digits":
                qm = ptq.quantize(digits, xtr[:256], r, eval_data=xte[:64])
            else:
                qm = ptq.quantize(model, "samples", r, calib_size=32, eval_size=8)
            d = qm.save(a.out / f"{model}-{r}", force=True)
            res[f"{model}/{r}"] = {f: hashlib.sha256((d / f).read_bytes()).hexdigest() for f in FILES}
            print(model, r, *(h[:12] for h in res[f"{model}/{r}"].values()), f"{time.perf_counter() - t0:.0f}s", flush=True)
    (a.json or a.out / "hashes.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
