"""Shared by the method benchmarks: calibrate a model once, then quantize many recipe variants on it.

One `ptq.api.prepare` (capture + statistics, w8a8's [calibration]) serves all the rows of a model;
each row is one `quantize_prepared` through the integer simulator, with fidelity against FP32 on the
same held-out sample crops. A recipe whose own [calibration] asks for other statistics (`bitplane`'s
coherent sensitivity) is measured on the shared ones, and its row says so (`own_calibration`);
`benchmarks.draws` prepares each row on its own.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Iterable

import torch

from ptq.api import STAGE_KEYS, Prepared, QuantizedModel, prepare, quantize_prepared
from ptq.recipe import resolve


def prepare_model(model: str, calib: int, evals: int) -> Prepared:
    """Real weights for efficientnet_lite0; random weights for the torchvision models (speed and noise only)."""
    weights = None if model == "efficientnet_lite0" else "random"
    return prepare(model, "samples", "w8a8", weights=weights, calib_size=calib, eval_size=evals)


def prepared_calibration(prep: Prepared) -> dict[str, object]:
    """The [calibration] keys the prepared statistics were collected with, as overrides: a variant
    quantized on them must name the same section."""
    return {f"calibration.{k}": v for k, v in prep.recipe["calibration"].items()}


def statistics_keys(recipe: Any, over: dict, sets: dict) -> dict:
    """The [calibration] keys a row's statistics are collected with where they differ from w8a8's:
    the recipe's own, then its overrides, then `sets` (the keys that size later stages aside)."""
    base, own = resolve("w8a8")["calibration"], resolve(recipe, over)["calibration"]
    keys = {f"calibration.{k}": v for k, v in own.items() if k not in (*STAGE_KEYS, "layer_moments") and v != base[k]}
    return {**keys, **sets}


def fidelity_row(prep: Prepared, label: str, recipe: Any, over: dict,
                 extra: Callable[[QuantizedModel], dict] | None = None) -> dict:
    """One variant: mean weight bits, top-1/top-5 agreement, KL and SQNR vs FP32, verification, seconds."""
    t = time.perf_counter()
    qm = quantize_prepared(prep, recipe, {**over, **prepared_calibration(prep)})
    f, num = qm.report["fidelity"], qm.manifest.data["verification"]["numeric"]
    row = {"model": prep.model.spec["name"], "variant": label, "mean_weight_bits": qm.report["mean_weight_bits"],
           "top1_agreement": f["top1_agreement"], "top5_agreement": f["top5_agreement"], "kl": f["kl"],
           "sqnr_db": f["sqnr_db"], "verified": bool(num["ok"]),
           "sim_vs_reference_top1": num["top1_agreement_sim_vs_reference"],
           "min_share_within_1lsb": num["min_share_within_1lsb"], "max_lsb_error": num["max_lsb_error"],
           "layer_bits": [op["weight"]["bits"] for op in qm.manifest.weighted_ops()],
           "seconds": time.perf_counter() - t}
    own = statistics_keys(recipe, over, {})
    if any(prep.recipe["calibration"][k.split(".", 1)[1]] != v for k, v in own.items()):
        row["own_calibration"] = own  # measured on the prepared statistics instead
    if extra is not None:
        row.update(extra(qm))
    return row


Column = tuple[str, Callable[[dict], str]]
FIDELITY: list[Column] = [("top-1 agr. %", lambda r: f"{r['top1_agreement']:.1f}"), ("KL", lambda r: f"{r['kl']:.4f}"),
                          ("SQNR dB", lambda r: f"{r['sqnr_db']:.1f}")]


def table_main(doc: str, default_models: str, variants: Callable[[Prepared, argparse.Namespace], Iterable[tuple[str, Any, dict]]],
               columns: list[Column], extra: Callable[[QuantizedModel], dict] | None = None,
               add_args: Callable[[argparse.ArgumentParser], None] | None = None,
               after: Callable[[argparse.Namespace, dict], None] | None = None) -> None:
    """The command line of a method benchmark: per model, prepare once, one markdown row per variant
    (printed as it lands), `after` for measurements beyond the table, and optionally everything as
    JSON with the date and thread count."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--models", default=default_models)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--json")
    ap.add_argument("--only", help="run only the variants whose label contains one of these comma-separated words")
    if add_args:
        add_args(ap)
    a = ap.parse_args()
    cols: list[Column] = [("model", lambda r: r["model"]), ("variant", lambda r: r["variant"]), *columns,
                          ("verified (sim vs ref top-1 %, share ≤ 1 LSB)", lambda r: f"{r['verified']} "
                           f"({r['sim_vs_reference_top1']:.1f}, {r['min_share_within_1lsb']:.5f})")]
    print("| " + " | ".join(c[0] for c in cols) + " |\n|" + "---|" * len(cols))
    rows = []
    for m in a.models.split(","):
        prep = prepare_model(m, a.calib_size, a.eval_size)
        for label, recipe, over in variants(prep, a):
            if a.only and not any(w in label for w in a.only.split(",")):
                continue
            rows.append(fidelity_row(prep, label, recipe, over, extra))
            print("| " + " | ".join(f(rows[-1]) for _, f in cols) + " |", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(), "rows": rows}
    if after:
        after(a, out)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
