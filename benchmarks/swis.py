"""SWIS benchmark: shared bit positions against truncation to N bits and uniform (1 + N)-bit weights.

    python -m benchmarks.swis [--models efficientnet_lite0] [--shared-bits 3,2] [--calib-size 64] [--eval-size 256]

Rows per model and N, all through the integer simulator on held-out sample crops, fidelity vs FP32:
- `swis` as shipped: N per layer chosen by the allocator within the cycles and storage of N
  everywhere; truncation allocated the same way;
- N in every layer, stem and depthwise convs at 8 bits: SWIS, truncation, and uniform (1 + N)-bit
  weights (the same storage as SWIS without its shift amounts);
- for the first N, SWIS and truncation with the depthwise convs decomposed too (only the stem kept),
  the layers where the paper reports truncation collapsing on MobileNet-v2.
Two truncations: "truncate" is the paper's baseline (the 8-bit grid's scale, every weight keeps its
N most significant magnitude bits, rounded to nearest); "truncate+scale" also re-searches each
channel's scale for the N kept positions, which makes it a uniform (1 + N)-bit grid with a
power-of-two-free scale — a much stronger baseline than the paper's.
Cycles: bit-serial cycles per sample of the whole network (`ptq.bitserial` model) as a fraction of the
8-cycle bit-serial baseline, in parentheses without sorting the groups; uniform rows have no cycle
model. Other models (e.g. mobilenet_v2) run with random weights unless torchvision weights are in the
hub cache: their figures measure quantization noise, not accuracy.
"""
from __future__ import annotations

from ptq.ir import is_depthwise

from .variants import FIDELITY, table_main

def depthwise_layers(prep) -> list[str]:
    return [op.name for op in prep.graph.weighted_ops() if is_depthwise(op)]


def variants(prep, ns: list[int]) -> list[tuple[str, object, dict]]:
    pins = ["first"] + depthwise_layers(prep)
    fixed = {"swis.mode": "fixed", "overrides": [{"layers": pins, "swis": {"shared_bits": 7}}]}
    stem_only = {"swis.mode": "fixed", "overrides": [{"layers": ["first"], "swis": {"shared_bits": 7}}]}
    trunc = {"swis.positions": "truncate"}  # the N most significant positions, scale re-searched for them
    paper = {**trunc, "swis.scale_grid": 0}  # the paper's truncation: the 8-bit scale, its N top bits kept
    out = []
    for n in ns:
        sb = {"swis.shared_bits": n}
        out += [
            (f"swis N={n}: N per layer allocated (shipped)", "swis", sb),
            (f"truncate+scale N={n}: N per layer allocated", "swis", {**sb, **trunc}),
            (f"swis N={n} fixed (stem, depthwise 8-bit)", "swis", {**sb, **fixed}),
            (f"truncate+scale N={n} fixed (stem, depthwise 8-bit)", "swis", {**sb, **fixed, **trunc}),
            (f"truncate N={n} fixed (stem, depthwise 8-bit)", "swis", {**sb, **fixed, **paper}),
            (f"uniform {1 + n}-bit (stem, depthwise 8-bit)", "w8a8",
             {"weights.bits": 1 + n, "overrides": [{"layers": pins, "weights": {"bits": 8}}]}),
        ]
        if n == ns[0]:
            out += [(f"swis N={n} fixed (depthwise too)", "swis", {**sb, **stem_only}),
                    (f"truncate+scale N={n} fixed (depthwise too)", "swis", {**sb, **stem_only, **trunc}),
                    (f"truncate N={n} fixed (depthwise too)", "swis", {**sb, **stem_only, **paper})]
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
    table_main(__doc__, "efficientnet_lite0", lambda prep, a: variants(prep, [int(n) for n in a.shared_bits.split(",")]),
               [("storage bits", lambda r: f"{r['mean_weight_bits']:.2f}"), *FIDELITY,
                ("cycles / 8-bit serial (unsorted)", lambda r: "-" if r["cycles_vs_baseline"] is None
                 else f"{r['cycles_vs_baseline']:.3f} ({r['unsorted_vs_baseline']:.3f})")],
               cycles, shared_bits_arg)


if __name__ == "__main__":
    main()
