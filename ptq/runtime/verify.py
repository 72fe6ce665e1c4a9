"""Verification levels 1 and 2: structural facts and simulator-vs-reference agreement.

Level 1: the loader's validation (ranges, shapes, references) plus each layer's data-free
accumulator bound against its declared width. Level 2: per tensor, each op of the reference is run on
the simulator's own inputs and must agree within 1 LSB (a 1-LSB flip upstream is legitimately
amplified by large weights downstream, so independent runs are compared only end to end); end to
end, the independent simulator and reference runs must agree on top-1, or, for a sentence-embedding
model (its output is token states, where an argmax means nothing), give each sample the same pooled,
normalised embedding within a cosine of EMBEDDING_COSINE_REQUIRED.

The reference runs in float64: in float32 its rounding error near the .5 boundaries of requantization
flips single codes that later layers amplify (BENCHMARKS.md, verification: float32 against float64).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import bitserial
from ..calib.progress import progress
from ..errors import ManifestError
from ..ir import execute
from ..manifest import Manifest, validate
from ..manifest.header import SENTENCE_EMBEDDING_KINDS
from ..metrics import fidelity, sentence_embeddings
from .reference import Codec, reference_kernels
from .simulator import Simulator

LSB_SHARE_REQUIRED = 0.999
TOP1_REQUIRED = 0.995
DECISIVE_NOISE = 4.0  # a top-1 flip counts when the reference's margin exceeds this many RMS logit differences
# least per-sample cosine of simulator vs reference sentence embeddings: all-MiniLM-L6-v2 measured 0.978
# (w8a8) and 0.979 (w4a8) at worst on the 100 held-out sentences, means 0.992-0.993 (BENCHMARKS.md)
EMBEDDING_COSINE_REQUIRED = 0.95


def end_to_end(ya: np.ndarray, yb: np.ndarray) -> dict:
    """End-to-end agreement of simulator logits `ya` with reference logits `yb` (N, classes).

    The per-op check already proves every op within 1 LSB on identical inputs; end to end the two
    chains run independently, so those 1-LSB rounding ties propagate and can flip a sample whose top
    two reference logits are nearly tied. A flip counts only on a *decisive* sample, whose reference
    margin exceeds DECISIVE_NOISE × the RMS logit difference over all samples: a systematic error
    (a wrong bias, a wrong requantizer) moves the logits of every sample and flips decisive ones too.
    """
    d = ya - yb
    rms = float(np.sqrt(np.mean(d * d))) if d.size else 0.0
    top2 = np.sort(yb, axis=-1)[:, -2:] if yb.shape[-1] > 1 else np.concatenate([yb, yb], -1)
    decisive = (top2[:, 1] - top2[:, 0]) > DECISIVE_NOISE * rms
    agree = ya.argmax(-1) == yb.argmax(-1)
    f = fidelity(yb, ya)
    return {"top1_agreement_sim_vs_reference": f["top1_agreement"] if agree.size else 100.0,
            "decisive_samples": int(decisive.sum()),
            "top1_agreement_decisive": 100.0 * float(agree[decisive].mean()) if decisive.any() else 100.0,
            "logit_rms_difference": rms,
            "logit_sqnr_sim_vs_reference_db": f["sqnr_db"] if np.isfinite(f["sqnr_db"]) else None}


def embedding_end_to_end(ya: np.ndarray, yb: np.ndarray, x: np.ndarray) -> dict:
    """End-to-end agreement of a sentence-embedding model: per sample, the cosine between the
    simulator's and the reference's pooled, normalised embeddings (x: the packed inputs, whose mask
    says which tokens are pooled)."""
    cos = (sentence_embeddings(ya, x) * sentence_embeddings(yb, x)).sum(1)
    return {"embedding_cosine_min": float(cos.min()) if cos.size else 1.0,
            "embedding_cosine_mean": float(cos.mean()) if cos.size else 1.0}


def end_to_end_passed(num: dict) -> bool:
    """Level 2's end-to-end criterion: embedding cosine where it was measured, else decisive top-1."""
    if "embedding_cosine_min" in num:
        return num["embedding_cosine_min"] >= EMBEDDING_COSINE_REQUIRED
    return num["top1_agreement_decisive"] >= 100 * TOP1_REQUIRED


def end_to_end_text(num: dict) -> str:
    """The end-to-end figure in words, for the console and the card."""
    if "embedding_cosine_min" in num:
        return f"sentence-embedding cosine sim vs reference ≥ {num['embedding_cosine_min']:.6f}"
    return f"top-1 sim vs reference {num.get('top1_agreement_sim_vs_reference', 0):.2f}%"


def structural(m: Manifest) -> dict:
    """Level 1: every check of the loader (ranges, shapes, references, each scheme's own rules such as
    SWIS representability and cycle counts, requantizers against scales) and the data-free bounds."""
    try:
        validate(m, stored=False)
        problem = None
    except ManifestError as exc:
        problem = str(exc)
    layers = {}
    for op in m.weighted_ops():
        acc = op["accumulator"]
        layers[op["name"]] = {"data_free_bits": acc["data_free_bits"], "accumulator_bits": acc["bits"],
                              "data_free_ok": acc["data_free_bits"] <= acc["bits"]}
    out = {"ok": problem is None and all(v["data_free_ok"] for v in layers.values()), "problem": problem, "layers": layers}
    out.update(_bitserial(m, layers))
    return out


def _bitserial(m: Manifest, layers: dict) -> dict:
    """SWIS layers: bit-serial cycles per sample (ptq.bitserial; checked against the weights by the
    loader's validation) per layer, and their totals against the b₀-cycle baseline."""
    keys = ("cycles", "cycles_unsorted", "dense_cycles", "baseline_cycles")
    sched = {op["name"]: {k: op["weight"][k] for k in keys} for op in m.weighted_ops() if op["weight"]["scheme"] == "swis"}
    for name, s in sched.items():
        layers[name]["bitserial"] = s
    return {"bitserial": bitserial.totals(sched)} if sched else {}


def numeric(m: Manifest, batches, sim: Simulator | None = None, dtype: torch.dtype = torch.float64) -> dict:
    """Run simulator and reference in lockstep over `batches` of float inputs."""
    sim = sim or Simulator(m)
    codec = Codec(m)
    ref = reference_kernels(m, dtype)
    ik = sim.kernels()
    paired = {k: (lambda op, xs, k=k: (ik[k](op, [a for a, _ in xs]), ref[k](op, [b for _, b in xs]))) for k in ik}
    per_tensor: dict[str, list[int]] = {}
    sim_logits, ref_logits, inputs = [], [], []
    out = sim.graph.outputs[0]
    pooled = m.data.get("model", {}).get("kind") in SENTENCE_EMBEDDING_KINDS

    identical: dict[str, bool] = {}  # tensor → the simulator's codes equal the reference chain's own

    def compare(op, xs, y):
        a = y[0].to(dtype)
        # the reference on the simulator's inputs: where they equal the reference chain's own (nearly
        # every op), the chain has just computed exactly that, so it is not run a second time
        same = all(identical[t] for t in op.inputs)
        b = y[1] if same else ref[op.kind](op, [u.to(dtype) for u, _ in xs])
        d = (a - b).abs_()
        top = int(d.max()) if d.numel() else 0
        identical[op.output] = top == 0 if same else torch.equal(a, y[1])
        c = per_tensor.setdefault(op.output, [0, 0, 0])
        c[0] += d.numel() if top <= 1 else int((d <= 1).sum())
        c[1] += d.numel()
        c[2] = max(c[2], top)

    total = len(batches) if hasattr(batches, "__len__") else None
    with torch.no_grad(), progress("level 2: simulator vs reference (batches)", total) as advance:
        for x in batches:
            advance()
            if pooled:
                inputs.append(x.numpy())
            start = (sim.quantize_input(x), codec.quantize(x.to(dtype), sim.graph.input))
            identical[sim.graph.input] = torch.equal(start[0].to(dtype), start[1])
            res = execute(sim.graph, start, paired, on_output=compare)[out]
            sim_logits.append(np.asarray(sim.dequantize(res[0], out), np.float64).reshape(res[0].shape[0], -1))
            ref_logits.append(codec.dequantize(res[1], out).numpy().astype(np.float64).reshape(res[0].shape[0], -1))
    shares = {t: c[0] / c[1] for t, c in per_tensor.items() if c[1]}
    worst = min(shares, key=shares.get) if shares else None
    ya, yb = np.concatenate(sim_logits), np.concatenate(ref_logits)
    e2e = embedding_end_to_end(ya, yb, np.concatenate(inputs)) if pooled else end_to_end(ya, yb)
    return {
        "samples": sum(len(y) for y in sim_logits),
        "min_share_within_1lsb": shares[worst] if worst else 1.0,
        "worst_tensor": worst,
        "max_lsb_error": max((c[2] for c in per_tensor.values()), default=0),
        **e2e,
        "ok": (shares[worst] if worst else 1.0) >= LSB_SHARE_REQUIRED and end_to_end_passed(e2e),
        "tensors": {t: {"share_within_1lsb": s, "max_lsb_error": per_tensor[t][2]} for t, s in sorted(shares.items())},
    }


def run_verification(m: Manifest, batches, accumulator: str | None = None, accumulator_bits: int | None = None) -> dict:
    """Levels 1 and 2 on `batches`, with the simulator's accumulator behaviour per layer.

    `accumulator` / `accumulator_bits` override every layer's mode and width P (what-if runs).
    Overflows count against the verdict when the run or any layer of the manifest wraps or
    saturates (the values change the result); in an all-`exact` run they are reported only.
    """
    sim = Simulator(m, accumulator, accumulator_bits)
    level1 = structural(m)
    level2 = numeric(m, batches, sim)
    layers = {name: st.to_dict() for name, st in sim.layers.items()}
    overflows = sum(v["overflows"] for v in layers.values())
    counted = accumulator in ("wrap", "saturate") or any(op["accumulator"]["mode"] != "exact" for op in m.weighted_ops())
    verified = bool(level1["ok"] and level2["ok"] and (overflows == 0 or not counted))
    return {"verified": verified, "reason": None if verified else failure_reason(level1, level2, layers if counted else {}),
            "structural": level1, "numeric": level2, "overflows": overflows, "overflows_counted": counted,
            "accumulator_mode": accumulator or "manifest", "layers": layers}


def failure_reason(level1: dict, level2: dict, layers: dict | None = None) -> str:
    """One line naming every failing check: level 1's validation problem or the layers whose
    data-free bound exceeds their accumulator, level 2's numbers against their thresholds, and the
    layers that overflowed (`layers`: per-layer accumulator records, where overflows count)."""
    reasons = []
    if level1["problem"]:
        reasons.append(f"level 1: {level1['problem']}")
    over = [f"{name} ({l['data_free_bits']} > {l['accumulator_bits']} bits)"
            for name, l in level1["layers"].items() if not l["data_free_ok"]]
    if over:
        more = f" and {len(over) - 3} more" if len(over) > 3 else ""
        reasons.append(f"level 1: the data-free accumulator bound exceeds the declared width in {', '.join(over[:3])}{more}")
    share = level2["min_share_within_1lsb"]
    if share < LSB_SHARE_REQUIRED:
        reasons.append(f"level 2: {100 * share:.2f}% of tensor {level2['worst_tensor']} is within 1 LSB of the "
                       f"reference (needs {100 * LSB_SHARE_REQUIRED:g}%)")
    if "embedding_cosine_min" in level2 and not end_to_end_passed(level2):
        reasons.append(f"level 2: the least sentence-embedding cosine with the reference is "
                       f"{level2['embedding_cosine_min']:.6f} (needs {EMBEDDING_COSINE_REQUIRED:g})")
    top1 = level2.get("top1_agreement_decisive", 100.0)
    if top1 < 100 * TOP1_REQUIRED:
        reasons.append(f"level 2: top-1 agreement with the reference on the {level2['decisive_samples']} decisive "
                       f"samples is {top1:.1f}% (needs {100 * TOP1_REQUIRED:g}%)")
    flows = {name: l["overflows"] for name, l in (layers or {}).items() if l["overflows"]}
    if flows:
        reasons.append(f"{sum(flows.values())} accumulator overflow(s) in "
                       + ", ".join(f"{name} ({n})" for name, n in list(flows.items())[:3])
                       + (f" and {len(flows) - 3} more layers" if len(flows) > 3 else ""))
    return "; ".join(reasons)
