"""Recipes: TOML files naming a method and its parameters, validated against one schema.

The schema is the base sections below plus the sections each registered method declares
(`ptq.methods.register`). Every default is written out in the resolved recipe (it goes into the
manifest; the [encoder] section only for graphs it applies to), unknown keys are errors naming the closest valid key, and `--set key=value` overrides
any leaf. A recipe is data: reading one never imports or runs code it names.
"""
from __future__ import annotations

import copy
import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .methods import METHODS
from .calib.sensitivity import SENSITIVITIES
from .ir.grids import ROUNDINGS
from .methods.fields import Field, layer_setting  # noqa: F401  (layer_setting: part of the recipe API)
from .methods.selectors import check_selector


BASE_SCHEMA: dict[str, dict[str, Field]] = {
    "": {
        "method": Field("uniform", str, help="weight method (see `ptq recipes`)"),
        "description": Field("", str),
        "budget_key": Field("", str, help="what a sweep budget (mean weight bits) sets: 'section.key', or "
                            "'section.key / section.key2' to set budget ÷ key2 (e.g. multipoint.budget / multipoint.bits)"),
    },
    "weights": {
        "bits": Field(8, int, lo=2, hi=8, help="weight bits (per-channel symmetric, narrow range)"),
        "clip": Field("output", str, ("output", "mse", "minmax"),
                      help="clipping search: output error (H-weighted), weight MSE, or none"),
        "rounding": Field("nearest", str, ROUNDINGS,
                          help="how weights reach the grid: nearest, error feedback (GPTQ), or learned (block-wise AdaRound)"),
        "ridge": Field(0.0, float, lo=0.0, hi=100.0,
                       help="clip searches and error feedback use H + ridge·(inputs / calibration samples)·mean(diag H)·I: "
                            "a wide layer's H, from few photos, is trusted less (a classifier's H of rank under a quarter "
                            "of its inputs gets at least 1·mean(diag H))"),
    },
    "rounding": {
        "order": Field("diag", str, ("diag", "natural"),
                       help="feedback: decide input columns by descending H diagonal, or in natural order"),
        "damp": Field(0.01, float, lo=0.0, hi=1.0, help="feedback: H + damp·mean(diag H)·I"),
        "block": Field(128, int, lo=1, hi=65536, help="feedback: columns per lazy block update"),
        "sequential": Field(False, bool,
                            help="feedback: each layer's H measured on the model quantized so far, not on the FP32 model"),
        "target": Field("layer", str, ("layer", "float"),
                        help="sequential feedback: aim at the layer's output on its quantized inputs, or at the FP32 model's output of the layer"),
        "target_damp": Field(1.0, float, lo=0.0, hi=1000.0,
                             help="float target: the moved weights' ridge, H + target_damp·mean(diag H)·I (their fit to the calibration patches shrinks as it grows)"),
        "iterations": Field(1000, int, lo=1, hi=100_000, help="learned: optimiser steps per block"),
        "samples": Field(128, int, lo=1, hi=100_000,
                         help="learned and sequential feedback: the first calibration samples the model quantized so far runs on"),
        "flip": Field(False, bool, help="learned and sequential feedback: run on the samples and on their left-right mirror "
                                        "images (image inputs (C, H, W) only; ignored otherwise): twice the samples from the same photos"),
        "batch_size": Field(8, int, lo=1, hi=4096,
                            help="learned: samples per optimiser step; also the mini-batch the walk of the model quantized so far runs in"),
        "learning_rate": Field(0.05, float, lo=1e-6, hi=1.0, help="learned: Adam step size of the rounding variables"),
        "objective": Field("mse", str, ("mse", "fisher"),
                           help="learned: each block's output error as a plain mean square, or weighted per channel by its Fisher sensitivity"),
        "drop": Field(0.0, float, lo=0.0, hi=0.99,
                      help="learned: during the optimisation, the probability each activation value of a block (its input "
                           "included, from the FP32 model) keeps its float value instead of its quantized one (QDrop)"),
        "start": Field("nearest", str, ("nearest", "feedback"),
                       help="learned: the integers the relaxation starts from and must beat, the method's nearest ones or error "
                            "feedback's (on the calibration H; each weight's pair then lies around its feedback-updated value)"),
        "bias_rate": Field(0.0, float, lo=0.0, hi=1.0,
                           help="learned: Adam step size of each layer's bias, learned with its rounding against the block's output, "
                                "in 1/255ths of the layer's output range (0: every bias stays the model's until bias correction)"),
        "regularizer": Field(100.0, float, lo=0.0, hi=1e6,
                             help="learned: weight of the term that drives each choice to up or down, against the block's error relative to nearest rounding"),
    },
    "activations": {
        "bits": Field(8, int, lo=2, hi=16, help="activation bits (per-tensor affine)"),
        "observer": Field("mse", str, ("minmax", "percentile", "mse")),
        "percentile": Field(99.99, float, lo=50.0, hi=100.0),
        "output_bits": Field(16, int, lo=2, hi=16, help="bits of the model's output tensor (logits)"),
    },
    "encoder": {
        "gemm_input_bits": Field(12, int, lo=2, hi=16,
                                 help="graphs with LayerNorm: bits (at least activations.bits) of the GEMM inputs a LayerNorm "
                                      "or GELU produces; recorded in their manifests only"),
    },
    "bias_correction": {
        "mode": Field("auto", str, ("auto", "layer", "all", "depthwise", "none"),
                      help="auto: of none/depthwise/all, the simplest whose calibration KL is within 5% of the least (see choose_samples); "
                           "layer: each layer's correction kept where it lowers that layer's own output error"),
        "samples": Field(128, int, lo=1, hi=100_000, help="calibration samples the correction is measured on"),
        "choose_samples": Field(32, int, lo=1, hi=100_000,
                                help="auto: this many of those samples, spread evenly over them, compare the candidates; "
                                     "the chosen mode is then measured on all of them"),
    },
    "accumulator": {
        "bits": Field(32, int, lo=8, hi=32, help="accumulator width P every conv/linear must fit (recorded per layer)"),
        "mode": Field("exact", str, ("exact", "wrap", "saturate"),
                      help="how the simulator treats a P-bit accumulator: report only, two's-complement wrap, saturate"),
    },
    "calibration": {
        "size": Field(128, int, lo=1, hi=1_000_000),
        "batch_size": Field(16, int, lo=1, hi=4096),
        "positions": Field(256, int, lo=1, hi=1_000_000, help="patches sampled per image and layer for H"),
        "grouped_positions": Field(256, int, lo=1, hi=1_000_000,
                                   help="patches sampled per image for a grouped (depthwise) conv's H, a kernel's taps wide per group"),
        "verify_size": Field(32, int, lo=1, hi=100_000, help="samples the integer simulator verifies on"),
        "layer_moments": Field(True, bool,
                               help="collect every layer's input moments H (most of the statistics pass): output-error clipping, "
                                    "error feedback and the allocators read them; false for a recipe that reads none"),
        "sensitivity_samples": Field(32, int, lo=0, hi=100_000,
                                     help="samples for the per-channel Fisher sensitivity (one backward pass each; 0 skips it)"),
        "sensitivity": Field("diagonal", str, SENSITIVITIES,
                             help="how a channel's Fisher sensitivity counts its positions: diagonal (Σ E[g²], as if independent) "
                                  "or coherent (measured with a probe weight error; needs ~128 samples)"),
    },
}

def schema() -> dict[str, dict[str, Field]]:
    """Every recipe section: the base ones, then each registered method's."""
    out = dict(BASE_SCHEMA)
    for m in METHODS.values():
        out.update(m.sections)
    return out


def override_keys() -> dict[str, Field]:
    """The 'section.key' settings that [[overrides]] may set per layer (those some method reads per
    layer), with their fields."""
    full = schema()
    keys = [k for m in METHODS.values() for k in m.override_keys]
    return {k: full[k.split(".")[0]][k.split(".")[1]] for k in keys}


def _check_override_methods(recipe: dict) -> None:
    """Refuse a per-layer key the recipe's method does not read (another method's): it would be ignored."""
    method = METHODS[recipe["method"]]
    for i, o in enumerate(recipe["overrides"]):
        for key in o:
            if key != "layers" and key not in method.override_keys:
                owner = next(m.name for m in METHODS.values() if key in m.override_keys)
                own = ", ".join(method.override_keys) or "none"
                raise RecipeError(f"overrides[{i}] sets '{key}', which only method '{owner}' reads, but this recipe's "
                                  f"method is '{method.name}' (its per-layer keys: {own}); drop it or change the method")


def _check_moments(recipe: dict) -> None:
    """Refuse a recipe that skips the layer input moments but reads them: its method would find none."""
    if recipe["calibration"]["layer_moments"]:
        return
    roundings = {recipe["weights"]["rounding"]} | {o["weights.rounding"] for o in recipe["overrides"] if "weights.rounding" in o}
    if METHODS[recipe["method"]].reads_moments(recipe):
        what = f"method '{recipe['method']}' with these settings"
    elif roundings - {"nearest"}:
        what = f"weights.rounding = '{sorted(roundings - {'nearest'})[0]}'"
    else:
        return
    raise RecipeError(f"calibration.layer_moments = false, but {what} reads the layer input moments; "
                      "set calibration.layer_moments = true (or use nearest rounding and a method that reads none)")


def _all_keys() -> list[str]:
    return [f"{s}.{k}" if s else k for s, fs in schema().items() for k in fs] + ["overrides"]


def _unknown(key: str) -> RecipeError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; run `ptq recipes --keys` for the valid keys"
    return RecipeError(f"unknown recipe key '{key}'{hint}")


def defaults() -> dict:
    out: dict[str, Any] = {}
    for section, fields in schema().items():
        target = out if not section else out.setdefault(section, {})
        for k, f in fields.items():
            target[k] = copy.deepcopy(f.default)
    out["overrides"] = []
    return out


def _merge(base: dict, new: dict, prefix: str = "") -> None:
    for k, v in new.items():
        key = f"{prefix}{k}"
        if not prefix and k == "overrides":
            if not isinstance(v, list):
                raise RecipeError("recipe key 'overrides' must be a list of [[overrides]] tables")
            base["overrides"] = [_check_override(o, i) for i, o in enumerate(v)]
        elif not prefix and isinstance(v, dict):
            if k not in schema() or not k:
                raise _unknown(k)
            _merge(base.setdefault(k, {}), v, f"{k}.")
        else:
            section = prefix[:-1]
            fields = schema().get(section, {})
            if k not in fields:
                raise _unknown(key)
            base[k] = fields[k].check(key, v)


def _check_override(o: Any, i: int) -> dict:
    if not isinstance(o, dict) or "layers" not in o:
        raise RecipeError(f"overrides[{i}] needs a 'layers' entry (a layer selector such as 'first', 'depthwise' "
                          "or 'early:0.1', a name glob, or a list of them)")
    layers = o["layers"]
    layers = [layers] if isinstance(layers, str) else layers
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise RecipeError(f"overrides[{i}].layers must be a string or a list of strings")
    for pattern in layers:
        try:
            check_selector(pattern)
        except RecipeError as exc:
            raise RecipeError(f"overrides[{i}]: {exc}") from None
    out: dict[str, Any] = {"layers": layers}
    flat: dict[str, Any] = {}
    for k, v in o.items():
        if k == "layers":
            continue
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    per_layer = override_keys()
    for k, v in flat.items():
        if k not in per_layer:
            close = difflib.get_close_matches(k, list(per_layer), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; per-layer keys are {', '.join(per_layer)}"
            raise RecipeError(f"unknown per-layer key '{k}' in overrides[{i}]{hint}")
        out[k] = per_layer[k].check(f"overrides[{i}].{k}", v)
    return out


def builtin_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("ptq.recipes").iterdir() if p.name.endswith(".toml"))


def _read(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():  # a directory named like a recipe (an --out) is not one
        if not path.is_file():
            raise RecipeError(f"recipe file {name_or_path} does not exist")
        text, label = _read_text(path), str(path)
    else:
        res = resources.files("ptq.recipes") / f"{name_or_path}.toml"
        if not res.is_file():
            close = difflib.get_close_matches(name_or_path, builtin_names(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"unknown recipe '{name_or_path}'{hint} (built-in: {', '.join(builtin_names())}; or give a .toml file)")
        text, label = res.read_text(), name_or_path
    try:
        return label, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"recipe {label} is not valid TOML: {exc}") from exc


def _read_text(path: Path) -> str:
    """A recipe file's text; unreadable or non-UTF-8 files (TOML is UTF-8) are named."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read recipe file {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from exc


def parse_value(text: str) -> Any:
    """A --set value as TOML (numbers, booleans, quoted strings, lists), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve(recipe: str | dict = "w8a8", overrides: dict[str, Any] | None = None) -> dict:
    """Defaults ← recipe file ← overrides ('section.key' → value); validated and complete."""
    out = defaults()
    if isinstance(recipe, dict):  # a resolved recipe may be given back: its name labels it
        name = recipe.get("name")
        label, data = (name if isinstance(name, str) and name else "<dict>"), {k: v for k, v in recipe.items() if k != "name"}
    else:
        label, data = _read(recipe)
    _merge(out, data)
    for key, value in (overrides or {}).items():
        if key == "overrides":
            _merge(out, {"overrides": value})
            continue
        parts = key.split(".")
        if len(parts) == 1:
            _merge(out, {key: value})
        elif len(parts) == 2:
            _merge(out, {parts[0]: {parts[1]: value}})
        else:
            raise _unknown(key)
    if out["method"] not in METHODS:
        close = difflib.get_close_matches(out["method"], list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"unknown method '{out['method']}'{hint} (available: {', '.join(sorted(METHODS))})")
    _check_override_methods(out)
    _check_moments(out)
    budget_keys(out)
    out["name"] = label
    return out


def budget_keys(recipe: dict) -> tuple[str, str | None]:
    """The recipe's `budget_key` as (key a budget sets, key it is divided by or None), checked."""
    text = recipe["budget_key"].strip()
    if not text:
        return "", None
    parts = [p.strip() for p in text.split("/")]
    if len(parts) > 2 or not all(parts):
        raise RecipeError(f"recipe key 'budget_key' must be 'section.key' or 'section.key / section.key2'; got {text!r}")
    for key in parts:
        section, _, k = key.partition(".")
        f = schema().get(section, {}).get(k) if section else None
        if f is None:
            raise RecipeError(f"budget_key names '{key}', which is not a recipe key; e.g. weights.bits")
        if f.kind not in (int, float):
            raise RecipeError(f"budget_key names '{key}', which is not numeric")
    return parts[0], parts[1] if len(parts) == 2 else None
