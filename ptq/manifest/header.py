"""The manifest's fields outside the graph: model, recipe, calibration, method and verification
records. Every field a command reads is checked here, so a manifest the loader accepts never makes
`ptq eval`, `card`, `inspect` or `export` crash; none of them is ever executed (a model spec is data)."""
from __future__ import annotations

import math
from typing import Any

from .fields import fail, need
from ..ir.grids import ROUNDINGS
from ..ir.ops import WEIGHTED_KINDS

MODEL_KINDS = ("torchvision", "efficientnet_lite", "minilm", "bert", "factory", "file", "module")
# models on packed (token ids, attention mask) inputs whose output, the last hidden state, is pooled
# into a sentence embedding (metrics.sentence_embeddings): evaluation and level 2 compare embeddings
SENTENCE_EMBEDDING_KINDS = ("minilm", "bert")
ACC_MODES = ("exact", "wrap", "saturate")
BOUNDS = ("data-type", "weight-level", "none")
# the recipe sections and leaves the card and the commands read from a manifest
RECIPE_READ = {"weights": {"clip": str}, "activations": {"observer": str}, "bias_correction": {"mode": str},
               "accumulator": {"bits": int, "mode": str}}
OPTIONAL_RECORDS = ("card", "verification", "bias_correction", "method_info")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _optional(obj: dict, key: str, kind: type | tuple, where: str) -> Any:
    return need(obj, key, kind, where) if obj.get(key) is not None else None


def check_model(d: dict, input_shape: list) -> None:
    """How `ptq eval` would rebuild the FP32 model: only names, hashes and numbers."""
    m = need(d, "model", dict, "")
    need(m, "name", str, "model")
    kind = need(m, "kind", str, "model")
    if kind not in MODEL_KINDS:
        raise fail("model.kind", f"must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    shape = need(m, "input_shape", list, "model")
    if shape != input_shape:
        raise fail("model.input_shape", f"is {shape!r} but the graph's input shape is {input_shape!r}")
    _optional(m, "weights", str, "model")
    if kind == "bert":  # a Hugging Face folder, rebuilt from its config.json
        need(m, "folder", str, "model")
    seed = need(m, "seed", int, "model")
    if not 0 <= seed < 2**63:
        raise fail("model.seed", f"must be in [0, 2^63), got {seed}")
    for key in ("weights_sha256", "model_sha256", "state_sha256"):
        h = _optional(m, key, str, "model")
        if h is not None and (len(h) != 64 or any(c not in "0123456789abcdef" for c in h)):
            raise fail(f"model.{key}", "must be 64 lowercase hex digits")
    pre = _optional(m, "preprocess", dict, "model")
    if pre is not None:
        need(pre, "name", str, "model.preprocess")
        for key in ("size", "resize"):
            if not 1 <= need(pre, key, int, "model.preprocess") <= 4096:
                raise fail(f"model.preprocess.{key}", f"must be 1..4096, got {pre[key]}")
        for key in ("mean", "std"):
            v = need(pre, key, list, "model.preprocess")
            if len(v) != 3 or not all(_number(x) for x in v) or (key == "std" and not all(x > 0 for x in v)):
                raise fail(f"model.preprocess.{key}", f"must be 3 finite numbers (RGB){' > 0' if key == 'std' else ''}, got {v!r}")
        ps = need(pre, "pixel_scale", (int, float), "model.preprocess")
        if not (_number(ps) and ps > 0):
            raise fail("model.preprocess.pixel_scale", f"must be a positive number, got {ps!r}")


def check_recipe(d: dict) -> None:
    r = need(d, "recipe", dict, "")
    need(r, "name", str, "recipe")
    need(r, "method", str, "recipe")
    for section, leaves in RECIPE_READ.items():
        s = need(r, section, dict, "recipe")
        for key, kind in leaves.items():
            need(s, key, kind, f"recipe.{section}")


def check_calibration(d: dict) -> None:
    c = _optional(d, "calibration", dict, "")
    if c is None:
        return
    for key in ("source", "kind"):
        _optional(c, key, str, "calibration")
    for key in ("size", "seed", "batch_size"):
        v = _optional(c, key, int, "calibration")
        if v is not None and v < 0:
            raise fail(f"calibration.{key}", f"must be non-negative, got {v}")


def check_platform(d: dict) -> None:
    """Where the manifest was made (`ptq.determinism.platform_record`): names only."""
    p = _optional(d, "platform", dict, "")
    for key in p or ():
        need(p, key, str, "platform")


def check_method_info(d: dict) -> None:
    info = _optional(d, "method_info", dict, "")
    a = None if info is None else info.get("allocator")
    if isinstance(a, dict):
        need(a, "solver", str, "method_info.allocator")
        need(a, "status", str, "method_info.allocator")
        if not _number(need(a, "objective", (int, float), "method_info.allocator")):
            raise fail("method_info.allocator.objective", "must be a finite number")
        _optional(a, "budgets", dict, "method_info.allocator")
    elif a == "naive":
        need(info, "weight_bits", int, "method_info")
        need(info, "input_bits", int, "method_info")
    elif a is not None:
        raise fail("method_info.allocator", f"must be a record or 'naive', got {a!r}")
    rounding = None if info is None else _optional(info, "rounding", dict, "method_info")
    for layer, rec in (rounding or {}).items():
        where = f"method_info.rounding.{layer}"
        if not isinstance(rec, dict):
            raise fail(where, "must be a record")
        if need(rec, "rounding", str, where) not in ROUNDINGS:
            raise fail(f"{where}.rounding", f"must be one of {', '.join(ROUNDINGS)}, got {rec['rounding']!r}")
        for key in ("error_nearest", "error"):
            if key in rec and not _number(rec[key]):
                raise fail(f"{where}.{key}", "must be a finite number")


def check_bias_correction(d: dict) -> None:
    """The mode `auto` chose and on how many samples (what the card prints)."""
    bc = _optional(d, "bias_correction", dict, "")
    if bc is None:
        return
    _optional(bc, "chosen", str, "bias_correction")
    n = _optional(bc, "chosen_on", int, "bias_correction")
    if n is not None and n < 1:
        raise fail("bias_correction.chosen_on", f"must be a positive sample count, got {n}")


def check_override_matches(d: dict) -> None:
    """`override_matches` (what the card lists): one list per recipe override, of weighted layer names."""
    matches = _optional(d, "override_matches", list, "")
    if matches is None:
        return
    overrides = need(d["recipe"], "overrides", list, "recipe")
    if len(matches) != len(overrides):
        raise fail("override_matches", f"must hold one list per recipe override ({len(overrides)}), got {len(matches)}")
    weighted = {op["name"] for op in d["graph"]["ops"] if op["kind"] in WEIGHTED_KINDS}
    for i, (o, names) in enumerate(zip(overrides, matches)):
        layers = need(o, "layers", list, f"recipe.overrides[{i}]") if isinstance(o, dict) else None
        if layers is None or not all(isinstance(p, str) for p in layers):
            raise fail(f"recipe.overrides[{i}].layers", "must be a list of layer selectors (strings)")
        if not isinstance(names, list) or not all(isinstance(n, str) and n in weighted for n in names):
            raise fail(f"override_matches[{i}]", "must be a list of the graph's conv/linear layer names")


def check_header(d: dict) -> None:
    """Every field outside `graph` and `tensors` that a command reads."""
    need(d, "created_by", str, "")
    check_model(d, d["graph"]["input_shape"])
    check_recipe(d)
    check_calibration(d)
    check_platform(d)
    check_method_info(d)
    check_bias_correction(d)
    check_override_matches(d)
    for key in OPTIONAL_RECORDS:
        _optional(d, key, dict, "")


def check_layer_records(op: dict, w: str) -> None:
    """A weighted op's accumulator, bias flags and attributes beyond what the executors check."""
    acc = op["accumulator"]
    mode = need(acc, "mode", str, f"{w}.accumulator")
    if mode not in ACC_MODES:
        raise fail(f"{w}.accumulator.mode", f"must be one of {', '.join(ACC_MODES)}, got {mode!r}")
    if not 1 <= need(acc, "data_free_bits", int, f"{w}.accumulator") <= 64:
        raise fail(f"{w}.accumulator.data_free_bits", "must be 1..64")
    if need(acc, "data_free_max", int, f"{w}.accumulator") < 0:
        raise fail(f"{w}.accumulator.data_free_max", "must be non-negative")
    bound = _optional(acc, "bound", str, f"{w}.accumulator")
    if bound is not None and bound not in BOUNDS:
        raise fail(f"{w}.accumulator.bound", f"must be one of {', '.join(BOUNDS)}, got {bound!r}")
    b = op["bias"]
    need(b, "corrected", bool, f"{w}.bias")
    if need(b, "saturated", int, f"{w}.bias") < 0:
        raise fail(f"{w}.bias.saturated", "must be non-negative")
    bpw = need(op["weight"], "bits_per_weight", (int, float), f"{w}.weight")
    if not (_number(bpw) and 0 < bpw <= 64):
        raise fail(f"{w}.weight.bits_per_weight", f"must be a number in (0, 64], got {bpw!r}")
    a = op["attrs"]
    macs = a.get("macs")
    if macs is not None and (type(macs) is not int or macs < 0):
        raise fail(f"{w}.attrs.macs", f"must be a non-negative integer, got {macs!r}")
    if "bn_folded" in a and not isinstance(a["bn_folded"], bool):
        raise fail(f"{w}.attrs.bn_folded", "must be true or false")
