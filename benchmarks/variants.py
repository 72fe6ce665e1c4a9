"""Shared by the method benchmarks: calibrate a model once, then quantize many recipe variants on it.

Every recipe ships the same [calibration] section, so one `ptq.api.prepare` (capture + statistics)
serves all the rows of a model; each row is one `quantize_prepared` through the integer simulator,
with fidelity against FP32 on the same held-out sample crops.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from ptq.api import Prepared, QuantizedModel, prepare, quantize_prepared


def prepare_model(model: str, calib: int, evals: int) -> Prepared:
    """Real weights for efficientnet_lite0; random weights for the torchvision models (speed and noise only)."""
    weights = None if model == "efficientnet_lite0" else "random"
    return prepare(model, "samples", "w8a8", weights=weights, calib_size=calib, eval_size=evals)


def fidelity_row(prep: Prepared, label: str, recipe: Any, over: dict,
                 extra: Callable[[QuantizedModel], dict] | None = None) -> dict:
    """One variant: mean weight bits, top-1/top-5 agreement, KL and SQNR vs FP32, verification, seconds."""
    t = time.perf_counter()
    qm = quantize_prepared(prep, recipe, {**over, "calibration.size": prep.recipe["calibration"]["size"]})
    f, num = qm.report["fidelity"], qm.manifest.data["verification"]["numeric"]
    row = {"model": prep.model.spec["name"], "variant": label, "mean_weight_bits": qm.report["mean_weight_bits"],
           "top1_agreement": f["top1_agreement"], "top5_agreement": f["top5_agreement"], "kl": f["kl"],
           "sqnr_db": f["sqnr_db"], "verified": bool(num["ok"]),
           "sim_vs_reference_top1": num["top1_agreement_sim_vs_reference"],
           "layer_bits": [op["weight"]["bits"] for op in qm.manifest.weighted_ops()],
           "seconds": time.perf_counter() - t}
    if extra is not None:
        row.update(extra(qm))
    return row
