"""The quantization card (card.md) and the per-layer bit-width plot, from the manifest alone.

The card lists the design choices that otherwise confound comparisons between PTQ results.
"""
from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np

from .manifest import Manifest, weight_summary
from .manifest.header import SENTENCE_EMBEDDING_KINDS
from .manifest.schemes import point_bits
from .runtime.verify import DECISIVE_NOISE, EMBEDDING_COSINE_REQUIRED


def card_fields(m: Manifest, fidelity: dict | None, verification: dict | None) -> dict[str, Any]:
    r = m.data["recipe"]
    ws = weight_summary(m)
    layers = ws["layers"]
    encs = m.graph["encodings"]
    act_bits = sorted({e["bits"] for e in encs.values()})
    acc_bits = sorted({op["accumulator"]["bits"] for op in m.weighted_ops()})
    corrected = sum(1 for op in m.weighted_ops() if op["bias"]["corrected"])
    bn = sum(1 for op in m.weighted_ops() if op["attrs"].get("bn_folded"))
    cal = m.data.get("calibration", {})
    transformer_ops = sorted({op["kind"] for op in m.ops} & {"matmul", "layernorm", "softmax", "embedding"})
    data_kind = ("sentences" if m.data["model"].get("kind") in SENTENCE_EMBEDDING_KINDS and cal.get("kind") in ("samples", "text")
                 else "real photos" if cal.get("kind") in ("samples", "folder") else "tensor file")
    return {
        "method": r["method"], "recipe": r["name"],
        "weights": f"per-channel symmetric, narrow range, scheme {', '.join(sorted({l['scheme'] for l in layers}))}",
        "weight_clipping": r["weights"]["clip"],
        "activations": f"per-tensor affine (unsigned codes with zero point), {'/'.join(map(str, act_bits))} bits, observer {r['activations']['observer']}",
        "rounding": "round half up (floor(x + 1/2)) for activations and requantization; dyadic requantization with 31-bit mantissas",
        "weight_rounding": _weight_rounding(m),
        "first_layer_bits": layers[0]["bits"] if layers else None,
        "last_layer_bits": layers[-1]["bits"] if layers else None,
        "quantized_tensors": "weights, activations, biases (int32), residual adds and pools (integer requantization)"
                             + (f"; {', '.join(transformer_ops)} in integer arithmetic (README, Transformers)" if transformer_ops else ""),
        "mean_weight_bits": ws["mean_weight_bits"], "max_weight_bits": ws["max_weight_bits"],
        "accumulator": f"{'/'.join(map(str, acc_bits))}-bit, mode {m.weighted_ops()[0]['accumulator']['mode'] if layers else '-'}; "
                       + "bound met: " + ", ".join(f"{k} {v} layers" for k, v in sorted(Counter(
                           op["accumulator"].get("bound", "none") for op in m.weighted_ops()).items())),
        "allocation": _allocation(m.data.get("method_info", {}), r),
        "compression": f"{32.0 / max(ws['mean_weight_bits'], 1e-9):.2f}x (32-bit floats / mean weight bits)",
        "multipoint": _multipoint(m),
        "bit_planes": _bitplanes(m),
        "bit_serial": _bitserial(m),
        "batchnorm_folded": f"{bn} BatchNorm layers folded into the preceding convolutions",
        "float_islands": "none",
        "bias_correction": _bias_correction(m.data.get("bias_correction") or {}, r["bias_correction"]["mode"], corrected, len(layers)),
        "calibration": f"{cal.get('size')} samples from {cal.get('source')} ({data_kind}), seed {cal.get('seed')}",
        "model": f"{m.data['model']['name']} (weights: {m.data['model'].get('weights') or 'default'})",
        "platform": _platform(m.data.get("platform")),
        "fidelity": fidelity,
        "verification": verification,
    }


def _platform(p: dict | None) -> str:
    """Where the same inputs and seed give the same bytes (`ptq.determinism.platform_record`)."""
    if not p:
        return "not recorded"
    return (f"torch {p.get('torch')}, numpy {p.get('numpy')}, CPU kernels {p.get('cpu_kernels')}: the same inputs "
            "and seed give the same bytes here; another CPU's kernels sum in another order and may move low-bit integers")


def _bias_correction(record: dict, mode: str, corrected: int, layers: int) -> str:
    """The mode, and for `auto` the mode it chose and on how many samples."""
    how = mode
    if record.get("chosen"):
        how = f"auto, chose {record['chosen']}"
        if record.get("chosen_on"):
            how += f" on {record['chosen_on']} samples"
    return f"{how} ({corrected} of {layers} layers corrected)"


def _weight_rounding(m: Manifest) -> str:
    """Which rounding decided the weights' integers, on how many layers, and the output error it removed."""
    rec = _rounding_records(m)
    if not rec:
        return "nearest grid value (no rounding engine)"
    counts = Counter(r["rounding"] for r in rec.values())
    done = [r for r in rec.values() if "error" in r]
    text = ", ".join(f"{k} on {v} layers" for k, v in sorted(counts.items()))
    if done:
        near = sum(r["error_nearest"] for r in done)
        text += (f"; relative output error summed over those layers {near:.4g} with nearest → "
                 f"{sum(r['error'] for r in done):.4g} (per layer: the table below)")
    if any(r.get("mirrored") for r in rec.values()):
        text += "; decided on the calibration samples and their mirror images"
    biased = sum(r.get("bias") == "learned" for r in rec.values())
    if biased:
        text += f"; biases learned with the rounding on {biased} layers"
    return text


def _rounding_records(m: Manifest) -> dict:
    """method_info.rounding in the graph's layer order (a saved manifest's keys are sorted)."""
    rec = m.data.get("method_info", {}).get("rounding") or {}
    return {op["name"]: rec[op["name"]] for op in m.weighted_ops() if op["name"] in rec}


def _rounding_table(m: Manifest) -> list[str]:
    rec = _rounding_records(m)
    if not rec:
        return []
    lines = ["", "## Weight rounding per layer", "",
             "relative output error Σ(w−ŵ)ᵀH(w−ŵ) / ΣwᵀHw on the calibration inputs", "",
             "| layer | rounding | error, nearest | error |", "|---|---|---|---|"]
    for name, r in rec.items():
        how = r["rounding"] + (" from feedback" if r.get("start") == "feedback" else "") \
            + (", bias learned" if r.get("bias") == "learned" else "")
        if "error" in r:
            lines.append(f"| {name} | {how} | {r['error_nearest']:.4g} | {r['error']:.4g} |")
        else:
            lines.append(f"| {name} | {how} | – | – |")
    return lines


def _overrides_table(m: Manifest) -> list[str]:
    """Each [[overrides]] entry of the recipe: its selectors, what it sets, and the layers it selected."""
    matches = m.data.get("override_matches")
    if not matches:
        return []
    lines = ["", "## Layer overrides (recipe [[overrides]])", "",
             "| # | selectors | sets | layers selected |", "|---|---|---|---|"]
    for i, (o, names) in enumerate(zip(m.data["recipe"]["overrides"], matches)):
        sets = ", ".join(f"{k} = {v}" for k, v in o.items() if k != "layers")
        chosen = f"{len(names)}: {', '.join(names)}" if names else "none"
        lines.append(f"| {i} | {', '.join(o['layers'])} | {sets} | {chosen} |")
    return lines


def _allocation(info: dict, recipe: dict) -> str:
    a = info.get("allocator")
    if isinstance(a, dict):
        return (f"integer program, solver {a['solver']}, status {a['status']}, objective {a['objective']:.4g}"
                + (f", budgets {a['budgets']}" if a.get("budgets") else "") + f"; {_error_currency(recipe)} (solve time: report.json)")
    if a == "naive":
        return f"naive: {info['weight_bits']}-bit weights and {info['input_bits']}-bit inputs in every layer"
    return "fixed by the recipe"


def _error_currency(recipe: dict) -> str:
    """What the allocator's candidate errors are in (`ptq.methods.base.error_weights`)."""
    cal = recipe.get("calibration", {})
    if recipe.get("bitplane", {}).get("error") == "weight":
        return "candidates' errors on the weights alone (bitplane.error = weight)"
    if cal.get("sensitivity_samples", 32) == 0:
        return "each layer's output error relative to its output energy (no Fisher sensitivity measured)"
    return (f"each channel's output error weighted by its Fisher sensitivity ({cal.get('sensitivity', 'diagonal')}, "
            f"{cal.get('sensitivity_samples', 32)} samples)")


def _bitplanes(m: Manifest) -> str:
    """Bit-plane summary (bitplane recipe): 2-bit slice sparsity and the planes dropped, over all layers."""
    recs = [(op["weight"]["bitplanes"], int(np.prod(op["weight"]["shape"]))) for op in m.weighted_ops()
            if "bitplanes" in op["weight"]]
    if not recs:
        return "-"
    n = sum(p for _, p in recs)
    sparsity = sum(b["slice2_sparsity"] * p for b, p in recs) / n
    free = sum(1 for b, _ in recs if b["msb_free"])
    clipped = sum(1 for b, _ in recs if b["msb_clipped"])
    lsb = sum(b["lsb_dropped"] * p for b, p in recs) / n
    return (f"2-bit slice sparsity {100 * sparsity:.1f}%; empty MSB planes dropped free in {free} layers, "
            f"non-empty MSB planes clipped in {clipped}; mean LSB planes dropped {lsb:.2f} (planes.png)")


def _points(m: Manifest) -> list[tuple[dict, np.ndarray]]:
    """Multipoint layers with their points per channel."""
    return [(op, np.asarray(m.tensor(op["weight"]["extra"]["points_per_channel"])))
            for op in m.weighted_ops() if op["weight"]["scheme"] == "multipoint"]


def _multipoint(m: Manifest) -> str:
    """Multipoint totals: parameter-weighted mean points, effective bits, and the share of channels
    by number of points over all multipoint layers."""
    recs = _points(m)
    if not recs:
        return "-"
    k = np.array([np.prod(op["weight"]["shape"][1:]) for op, _ in recs], np.float64)
    n = np.concatenate([np.repeat(kk, len(c)) for kk, (_, c) in zip(k, recs)])
    counts = np.concatenate([c for _, c in recs])
    bits = sum(op["weight"]["bits_per_weight"] * kk * len(c) for kk, (op, c) in zip(k, recs)) / n.sum()
    widths = sorted({tuple(point_bits(op["weight"])) for op, _ in recs if len(op["weight"]["terms"]) > 1})
    hist = ", ".join(f"{p} point{'s' if p > 1 else ''} {100 * np.mean(counts == p):.1f}%" for p in range(1, int(counts.max()) + 1))
    return (f"{float((counts * n).sum() / n.sum()):.3f} mean points per channel (parameter-weighted), {bits:.3f} effective "
            f"bits per weight over {len(recs)} layers; channels: {hist}"
            + (f"; point widths {', '.join('+'.join(map(str, w)) for w in widths)}" if widths else ""))


def _points_table(m: Manifest) -> list[str]:
    recs = [(op, c) for op, c in _points(m) if len(op["weight"]["terms"]) > 1]
    if not recs:
        return []
    most = max(int(c.max()) for _, c in recs)
    lines = ["", "## Multipoint: channels by number of points (layers with extra points)", "",
             "| layer | point bits | mean points | bits per weight | " + " | ".join(f"{p}" for p in range(1, most + 1)) + " |",
             "|---|---|---|---|" + "---|" * most]
    for op, c in recs:
        w = op["weight"]
        lines.append(f"| {op['name']} | {'+'.join(map(str, point_bits(w)))} | "
                     f"{w['mean_points']:.3f} | {w['bits_per_weight']:.3f} | "
                     + " | ".join(str(int((c == p).sum())) for p in range(1, most + 1)) + " |")
    return lines


def _swis_layers(m: Manifest) -> list[dict]:
    return [op for op in m.weighted_ops() if op["weight"]["scheme"] == "swis"]


def _bitserial(m: Manifest) -> str:
    """SWIS totals: bit-serial cycles per sample against the b₀-cycle baseline and the N-cycle cost of
    truncation (every group N cycles, no skipping)."""
    ops = _swis_layers(m)
    if not ops:
        return "-"
    tot = {k: sum(op["weight"][k] for op in ops) for k in ("cycles", "cycles_unsorted", "dense_cycles", "baseline_cycles")}
    w = ops[0]["weight"]
    return (f"{tot['cycles']:,} cycles per sample on {w['lanes']} lock-stepped lanes of G = {w['group']}: "
            f"{tot['cycles'] / max(tot['baseline_cycles'], 1):.3f} of the {w['bits']}-cycle bit-serial baseline "
            f"({tot['baseline_cycles']:,}), {tot['cycles'] / max(tot['dense_cycles'], 1):.3f} of truncation's N cycles per group "
            f"({tot['dense_cycles']:,}); unsorted issue order {tot['cycles_unsorted']:,}")


def _bitserial_table(m: Manifest) -> list[str]:
    ops = _swis_layers(m)
    if not ops:
        return []
    lines = ["", "## Bit-serial schedule (cycles per sample)", "",
             "| layer | N | cycles | unsorted | truncation (N per group) | baseline |", "|---|---|---|---|---|---|"]
    for op in ops:
        w = op["weight"]
        lines.append(f"| {op['name']} | {w['shared_bits']} | {w['cycles']:,} | {w['cycles_unsorted']:,} | "
                     f"{w['dense_cycles']:,} | {w['baseline_cycles']:,} |")
    return lines


def render_card(m: Manifest, fidelity: dict | None = None, verification: dict | None = None,
                level2: dict | None = None, evaluation_skipped: bool = False) -> str:
    """The card; `level2` (report.json's verification.level2) says how much level 2 verified, and
    `evaluation_skipped` that the run measured no fidelity (--eval-size 0)."""
    f = card_fields(m, fidelity, verification)
    lines = [f"# Quantization card — {m.data['model']['name']} / {f['recipe']}", "",
             "| choice | value |", "|---|---|"]
    for key in ("model", "method", "recipe", "weights", "weight_clipping", "weight_rounding", "activations", "rounding",
                "first_layer_bits", "last_layer_bits", "quantized_tensors", "mean_weight_bits", "max_weight_bits",
                "compression", "multipoint", "bit_planes", "bit_serial", "accumulator", "allocation", "batchnorm_folded", "float_islands", "bias_correction", "calibration", "platform"):
        v = f[key]
        v = f"{v:.3f}" if isinstance(v, float) else v
        lines.append(f"| {key.replace('_', ' ')} | {v} |")
    if m.data["model"].get("weights") == "random":
        lines += ["", "**Random weights**: this model was quantized with randomly initialised weights "
                  "(speed and smoke tests only); its fidelity says nothing about a trained model."]
    if fidelity:
        lines += ["", f"## Fidelity vs FP32 ({fidelity.get('data', '')}, {fidelity['samples']} samples)", "",
                  "| metric | value |", "|---|---|"]
        for k in ("top1_agreement", "top5_agreement", "kl", "sqnr_db", "accuracy", "fp32_accuracy", "sentence_cosine",
                  "sentence_cosine_min", "similarity_spearman"):
            if k in fidelity:
                lines.append(f"| {k} | {fidelity[k]:.4g} |")
    elif evaluation_skipped:
        lines += ["", "## Fidelity vs FP32", "", "Not measured: evaluation was skipped (`--eval-size 0`); "
                  "`ptq eval DIR` measures it."]
    if verification:
        num = verification.get("numeric", {})
        lines += ["", "## Verification", "",
                  f"- level 1 (structure, representability, data-free accumulator bounds): {'ok' if verification['structural']['ok'] else 'FAILED'}"
                  + (f" — {verification['structural']['problem']}" if verification["structural"].get("problem") else ""),
                  f"- level 2 (integer simulator vs fake-quant reference, {_verified_on(num, level2)}): "
                  f"{'ok' if num.get('ok') else 'FAILED'} — min share within 1 LSB {num.get('min_share_within_1lsb', 0):.5f}, "
                  + (f"least sentence-embedding cosine {num['embedding_cosine_min']:.6f} (mean {num['embedding_cosine_mean']:.6f}; "
                     f"the criterion is ≥ {EMBEDDING_COSINE_REQUIRED:g} per sample)" if "embedding_cosine_min" in num else
                     f"top-1 agreement {num.get('top1_agreement_sim_vs_reference', 0):.2f}% "
                     f"({num.get('top1_agreement_decisive', 0):.2f}% on the {num.get('decisive_samples', 0)} samples whose "
                     f"reference margin exceeds {DECISIVE_NOISE:g}× the RMS logit difference, the criterion)")]
    lines += _overrides_table(m)
    lines += _rounding_table(m)
    lines += _points_table(m)
    lines += _bitserial_table(m)
    return "\n".join(lines) + "\n"


def _verified_on(num: dict, level2: dict | None) -> str:
    """How much level 2 verified: the samples, and (when the run's report says) of how many
    calibration samples and under which `--verify` mode."""
    if not level2:
        return f"{num.get('samples')} samples"
    if level2["mode"] == "full":
        return f"all {level2['samples']} calibration samples, `--verify full`"
    return (f"the first {level2['samples']} of {level2['calibration_samples']} calibration samples, "
            f"`--verify sample`; `--verify full` or `ptq simulate` checks more")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def bits_png(m: Manifest) -> bytes:
    """Bar chart of per-layer weight bits (effective bits per weight)."""
    plt = _pyplot()
    layers = weight_summary(m)["layers"]
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.18), 3.2), dpi=100)
    ax.bar(range(len(layers)), [l["bits_per_weight"] for l in layers], color="#3a6ea5")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("bits per weight")
    ax.set_title(f"{m.data['model']['name']} — {m.data['recipe']['name']}")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    fig.tight_layout()
    return _png(fig)


def planes_png(m: Manifest) -> bytes | None:
    """Heat map of bit-plane density (share of weights with the bit set) per layer on the starting grid,
    with the planes each layer kept outlined; None when no layer carries a `bitplanes` record."""
    recs = [(op["name"], op["weight"]["bitplanes"]) for op in m.weighted_ops() if "bitplanes" in op["weight"]]
    if not recs:
        return None
    plt = _pyplot()
    planes = max(len(b["density"]) for _, b in recs)
    dens = np.full((planes, len(recs)), np.nan)
    for i, (_, b) in enumerate(recs):
        dens[:len(b["density"]), i] = b["density"]
    fig, ax = plt.subplots(figsize=(max(6, len(recs) * 0.18), 3.2), dpi=100)
    im = ax.imshow(dens, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=0.5)
    for i, (_, b) in enumerate(recs):
        lo, hi = b["kept_planes"]
        ax.add_patch(plt.Rectangle((i - 0.5, lo - 0.5), 1, hi - lo + 1, fill=False, edgecolor="white", lw=0.8))
    ax.set_xlabel("layer (graph order); outlined: planes kept")
    ax.set_ylabel("magnitude plane (LSB = 0)")
    ax.set_title(f"{m.data['model']['name']} — bit-plane density")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return _png(fig)
