"""What a manifest amounts to: parameter-weighted bits, bytes, and per-layer facts (for the card,
the report, `ptq inspect` and the ONNX metadata)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .format import Manifest


def weight_summary(m: Manifest) -> dict[str, Any]:
    """Parameter-weighted mean bits, max bits, weight bytes (with per-channel scales and biases)."""
    total_params = 0
    total_bits = 0.0
    model_bytes = 0
    max_bits = 0
    per_layer = []
    for op in m.weighted_ops():
        w = op["weight"]
        n = int(np.prod(w["shape"]))
        c = w["shape"][0]
        bpw = float(w["bits_per_weight"])
        total_params += n
        total_bits += bpw * n
        model_bytes += int(np.ceil(n * bpw / 8)) + 4 * c * (len(w["terms"]) + 1)
        max_bits = max(max_bits, w["bits"])
        per_layer.append({"name": op["name"], "scheme": w["scheme"], "bits": w["bits"], "bits_per_weight": bpw,
                          "params": n, "macs": op["attrs"].get("macs", 0)})
    return {"mean_weight_bits": total_bits / max(total_params, 1), "max_weight_bits": max_bits,
            "params": total_params, "model_bytes": model_bytes, "layers": per_layer}
