"""Bit-plane benchmark: calibrated plane allocation against uniform and the data-free variant at equal mean bits.

    python -m benchmarks.bitplane [--models efficientnet_lite0,resnet18] [--bits 4,3] [--calib-size 64] [--eval-size 256]

Rows per model and mean bit budget b, all through the integer simulator on held-out sample crops,
fidelity vs FP32: uniform b bits in every layer (the same mean), the shipped uniform `w4a8` (first and
last layer at 8 bits, so a higher mean) for reference, `bitplane` at mean b (plane costs from the
layer outputs on calibration data, Fisher-weighted) and its data-free variant (plane costs from the
weights alone). resnet18 runs with random weights unless torchvision weights are in the hub cache.
"""
from __future__ import annotations

from .variants import FIDELITY, table_main


def uniform_everywhere(bits: int) -> dict:
    return {"description": f"uniform {bits}-bit weights in every layer", "method": "uniform",
            "weights": {"bits": bits, "clip": "output"}, "activations": {"bits": 8, "observer": "mse"},
            "bias_correction": {"mode": "auto"}}


def variants(bits: list[int]) -> list[tuple[str, object, dict]]:
    out = [("uniform w4a8 (first/last 8)", "w4a8", {})]
    for b in bits:
        out += [(f"uniform {b} everywhere", uniform_everywhere(b), {}),
                (f"bitplane mean {b} (calibrated)", "bitplane", {"bitplane.mean_bits": float(b)}),
                (f"bitplane mean {b} (data-free)", "bitplane", {"bitplane.mean_bits": float(b), "bitplane.error": "weight"})]
    return out


def planes(qm) -> dict:
    return {"slice2_sparsity": qm.manifest.data.get("method_info", {}).get("slice2_sparsity")}


def bits_arg(ap) -> None:
    ap.add_argument("--bits", default="4,3")


def main() -> None:
    table_main(__doc__, "efficientnet_lite0,resnet18", lambda prep, a: variants([int(b) for b in a.bits.split(",")]),
               [("mean bits", lambda r: f"{r['mean_weight_bits']:.2f}"), ("compression", lambda r: f"{32 / r['mean_weight_bits']:.1f}x"),
                *FIDELITY, ("2-bit slice sparsity %", lambda r: "-" if r["slice2_sparsity"] is None else f"{100 * r['slice2_sparsity']:.1f}")],
               planes, bits_arg)


if __name__ == "__main__":
    main()
