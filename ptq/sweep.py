"""Fidelity vs mean weight bits: each recipe at several budgets, one calibration pass, a plot.

A budget (mean weight bits) reaches a recipe through its declared `budget_key` (see `ptq.recipe`):
`weights.bits` sets the uniform bits, `multipoint.budget / multipoint.bits` sets points per channel
so that bits × points = budget, `allocator.mean_weight_bits` sets the allocator's size budget. A
budget a recipe cannot express (3.5 bits for an integer key, or out of the key's range) is recorded
as skipped with the reason. The x axis is the measured mean weight bits, not the asked budget.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .api import Prepared, check_count, prepare, quantize_prepared
from .errors import BudgetError, PtqError, RecipeError
from .recipe import budget_keys, resolve, schema

BASELINE = "w8a8"  # the uniform curve overlaid at integer bits
METRICS = ("top1_agreement", "top5_agreement", "kl", "sqnr_db", "accuracy")


def parse_budgets(text: str) -> list[float]:
    """'3,3.5,4' → [3.0, 3.5, 4.0]; each a finite number of mean weight bits in (1, 32]."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or not all(math.isfinite(v) and 1 < v <= 32 for v in vals):
        raise BudgetError(f"--budgets must be comma-separated mean weight bits in (1, 32] like 3,4,8; got {text!r}")
    return sorted(set(vals))


def budget_overrides(recipe: dict, budget: float) -> dict[str, Any]:
    """The recipe override a budget means, through the recipe's budget_key; RecipeError if it cannot."""
    key, divisor = budget_keys(recipe)
    if not key:
        raise RecipeError(f"recipe {recipe['name']} declares no budget_key; add e.g. budget_key = \"weights.bits\"")
    section, k = key.split(".")
    value = budget / _get(recipe, divisor) if divisor else budget
    field = schema()[section][k]
    if field.kind is int:
        if abs(value - round(value)) > 1e-9:
            raise RecipeError(f"{key} = {value:g} is not a whole number")
        value = int(round(value))
    field.check(key, value)
    return {key: value}


def _get(recipe: dict, key: str) -> float:
    section, k = key.split(".")
    return recipe[section][k]


def _point(qm, recipe: str, budget: float) -> dict:
    f = qm.report["fidelity"]
    out = {"recipe": recipe, "budget": budget, "mean_weight_bits": qm.report["mean_weight_bits"],
           "model_bytes": qm.report["model_bytes"], "verified": bool(qm.report["verification"]["numeric"]["ok"])}
    out.update({m: f[m] for m in METRICS if m in f})
    return out


def sweep(model: Any, recipes: list[str], budgets: list[float], *, calib: Any = "samples",
          calib_size: int | None = None, eval_size: int = 64, eval_data: Any = None, seed: int = 0,
          weights: str | None = None, input_shape: tuple[int, ...] | None = None,
          baseline: bool = True, trust_model_file: bool = False) -> dict:
    """Every recipe at every budget it can express (+ uniform at integer bits); one prepare per
    distinct [calibration] section, reused across budgets and recipes."""
    check_count(eval_size, "evaluation size (--eval-size / eval_size=)")  # a sweep is its fidelity
    names = list(dict.fromkeys(recipes))
    if not names:
        raise RecipeError("give at least one --recipe")
    over = {"calibration.size": calib_size} if calib_size is not None else {}
    resolved = {n: resolve(n, over) for n in names}
    for n, r in resolved.items():
        if not budget_keys(r)[0]:
            raise RecipeError(f"recipe {n} declares no budget_key, so it cannot be swept; add e.g. budget_key = \"weights.bits\"")
    curves = [(n, n, budgets) for n in names]
    if baseline and BASELINE not in names:
        curves.append(("uniform", BASELINE, [b for b in budgets if b == int(b) and 2 <= b <= 8]))
        resolved[BASELINE] = resolve(BASELINE, over)
    cache: dict[str, Prepared] = {}
    points, skipped = [], []
    for label, name, bs in curves:
        r = resolved[name]
        ckey = json.dumps(r["calibration"], sort_keys=True)
        if ckey not in cache:
            cache[ckey] = prepare(model, calib, name, weights=weights, seed=seed, eval_data=eval_data,
                                  eval_size=eval_size, input_shape=input_shape, trust_model_file=trust_model_file,
                                  overrides=over)
        prep = cache[ckey]
        for b in bs:
            try:
                ov = budget_overrides(r, b)
            except RecipeError as exc:
                skipped.append({"recipe": label, "budget": b, "reason": str(exc)})
                continue
            qm = quantize_prepared(prep, name, {**over, **ov})
            points.append({**_point(qm, label, b), "set": ov})
    if not points:
        raise BudgetError(f"no recipe can express any of the budgets {budgets}: "
                          + "; ".join(f"{s['recipe']} @ {s['budget']:g}: {s['reason']}" for s in skipped[:3]))
    prep0 = next(iter(cache.values()))
    return {"model": prep0.model.spec["name"], "recipes": names, "budgets": budgets, "points": points,
            "skipped": skipped, "calibration": prep0.source.description, "calibration_passes": len(cache),
            "eval_size": eval_size, "seed": seed}


def load_peers(path: str | Path) -> list[dict]:
    """Peer points from a JSON file: a list of rows, or {"rows": [...]} as `benchmarks.run --out-json`
    writes. Rows need mean_weight_bits and top1_agreement; ptq's own rows are dropped (the sweep
    measures those). Each row gets a `name` (its own, else "tool config")."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PtqError(f"cannot read peer points from {p}: {exc}") from None
    rows = data.get("rows", []) if isinstance(data, dict) else data
    out = [{**r, "name": r.get("name") or " ".join(str(r[k]) for k in ("tool", "config") if r.get(k)) or "peer"}
           for r in rows if isinstance(r, dict) and "mean_weight_bits" in r and "top1_agreement" in r
           and r.get("tool") != "ptq"]
    if not out:
        raise PtqError(f"{p} holds no peer rows with mean_weight_bits and top1_agreement")
    return out


def peers_for(peers: list[dict], model: str) -> list[dict]:
    """The peer rows of `model` (rows that name no model are kept)."""
    return [r for r in peers if r.get("model", model) == model]


def plot(result: dict, path: str | Path, peers: list[dict] | None = None) -> Path:
    """Top-1 agreement and KL vs measured mean weight bits, one line per recipe, peers as markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = list(dict.fromkeys(p["recipe"] for p in result["points"]))
    for label in labels:
        pts = sorted((p for p in result["points"] if p["recipe"] == label), key=lambda p: p["mean_weight_bits"])
        x = [p["mean_weight_bits"] for p in pts]
        style = dict(ls="--", color="gray") if label == "uniform" else {}
        axes[0].plot(x, [p["top1_agreement"] for p in pts], marker="o", label=label, **style)
        axes[1].plot(x, [max(p["kl"], 1e-6) for p in pts], marker="o", label=label, **style)
    markers = "xP^vDs*"  # peers: own markers and darker colours, so none is taken for a recipe's line
    for i, peer in enumerate(peers or []):
        style = dict(marker=markers[i % len(markers)], s=55, color=plt.cm.Dark2(i % 8), label=peer["name"])
        axes[0].scatter(peer["mean_weight_bits"], peer["top1_agreement"], **style)
        if peer.get("kl") is not None:
            axes[1].scatter(peer["mean_weight_bits"], max(peer["kl"], 1e-6), **style)
    axes[0].set_ylabel("top-1 agreement with FP32 (%)")
    axes[1].set_ylabel("KL(FP32 ‖ quantized)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("mean weight bits (measured)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: fidelity vs weight bits ({result['eval_size']} held-out samples)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
