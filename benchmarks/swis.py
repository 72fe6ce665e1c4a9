"""SWIS benchmark: shared bit positions against truncation to N bits and uniform (1 + N)-bit weights.

    python -m benchmarks.swis [--models efficientnet_lite0,mobilenet_v2] [--shared-bits 3,2] [--calib-size 64] [--eval-size 256]

Rows per model and N, all through the integer simulator on held-out sample crops, fidelity vs FP32:
- `swis` as shipped (stem and depthwise convs at all 7 positions, i.e. plain 8-bit);
- truncation: every group keeps the N most significant positions (same scale search, same pins);
- uniform (1 + N)-bit weights with the same layers at 8 bits — the same storage as SWIS without its
  shift amounts;
- SWIS and truncation with the depthwise convs decomposed too (only the stem kept), the layers where
  the paper reports truncation collapsing on MobileNet-v2.
Cycles: bit-serial cycles per sample of the whole network (`ptq.bitserial` model) as a fraction of the
8-cycle bit-serial baseline; uniform rows have no cycle model. mobilenet_v2 runs with random weights
unless torchvision weights are in the hub cache: its figures measure quantization noise, not accuracy.
"""
from __future__ import annotations

from .variants import FIDELITY, table_main

PINS = ["first", "*_depthwise_conv"]  # efficientnet_lite0 names; mobilenet_v2's depthwise are matched by kind
STEM_ONLY = [{"layers": ["first"], "swis": {"shared_bits": 7, "min_shared_bits": 7}}]


def depthwise_layers(prep) -> list[str]:
    return [op.name for op in prep.graph.weighted_ops() if op.kind == "conv" and op.attrs.get("groups", 1) > 1
            and op.attrs["groups"] == op.weight.shape[0]]


def variants(prep, ns: list[int]) -> list[tuple[str, object, dict]]:
    pins = ["first"] + depthwise_layers(prep)
    swis_pins = [{"layers": pins, "swis": {"shared_bits": 7, "min_shared_bits": 7}}]
    out = []
    for n in ns:
        out += [
            (f"swis N={n} (stem, depthwise 8-bit)", "swis", {"swis.shared_bits": n, "overrides": swis_pins}),
            (f"truncate N={n} (stem, depthwise 8-bit)", "swis",
             {"swis.shared_bits": n, "swis.positions": "truncate", "overrides": swis_pins}),
            (f"uniform {1 + n}-bit (stem, depthwise 8-bit)", "w8a8",
             {"weights.bits": 1 + n, "overrides": [{"layers": pins, "weights": {"bits": 8}}]}),
            (f"swis N={n} (depthwise too)", "swis", {"swis.shared_bits": n, "overrides": STEM_ONLY}),
            (f"truncate N={n} (depthwise too)", "swis",
             {"swis.shared_bits": n, "swis.positions": "truncate", "overrides": STEM_ONLY}),
        ]
    return out


def cycles(qm) -> dict:
    info = qm.manifest.data.get("method_info", {}).get("swis")
    if info is None:
        return {"cycles_vs_baseline": None, "unsorted_vs_baseline": None}
    return {"cycles_vs_baseline": info["cycles_vs_baseline"],
            "unsorted_vs_baseline": info["cycles_unsorted"] / max(info["baseline_cycles"], 1)}


def shared_bits_arg(ap) -> None:
    ap.add_argument("--shared-bits", default="3,2")


def main() -> None:
    table_main(__doc__, "efficientnet_lite0,mobilenet_v2", lambda prep, a: variants(prep, [int(n) for n in a.shared_bits.split(",")]),
               [("storage bits", lambda r: f"{r['mean_weight_bits']:.2f}"), *FIDELITY,
                ("cycles / 8-bit serial (unsorted)", lambda r: "-" if r["cycles_vs_baseline"] is None
                 else f"{r['cycles_vs_baseline']:.3f} ({r['unsorted_vs_baseline']:.3f})")],
               cycles, shared_bits_arg)


if __name__ == "__main__":
    main()
