"""Layer selectors of `[[overrides]]`: structural selectors on a hand-built graph, and the shipped
recipes on the captured graphs of four real architectures (capture only, no quantization)."""
from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pytest

from ptq.api import check_override_patterns
from ptq.errors import RecipeError
from ptq.ir import Graph, Op
from ptq.methods.selectors import override_matches, select
from ptq.recipe import builtin_names, layer_setting, resolve

# what the multipoint recipes pinned before issue 22: EfficientNet-Lite module names
LITE0_NAMES_BEFORE = ["first", "*_depthwise_conv", "_blocks.[0-5].*"]


def conv(name: str, shape: tuple[int, ...], groups: int = 1) -> Op:
    return Op(name, "conv", ["x"], name, {"groups": groups}, np.zeros(shape, np.float32))


def small_graph() -> Graph:
    """Five weighted layers, 720 weights: stem 216, depthwise 72, grouped 144, pointwise 128, linear 160."""
    ops = [conv("stem", (8, 3, 3, 3)), conv("blocks.0.dw", (8, 1, 3, 3), 8), conv("blocks.0.grouped", (8, 2, 3, 3), 4),
           conv("blocks.0.pw", (16, 8, 1, 1)),
           Op("fc", "linear", ["x"], "fc", {}, np.zeros((10, 16), np.float32))]
    return Graph("x", (3, 8, 8), ops, ["fc"])


@pytest.mark.parametrize("selector, names", [
    ("first", ["stem"]), ("last", ["fc"]), ("first:2", ["stem", "blocks.0.dw"]), ("last:2", ["blocks.0.pw", "fc"]),
    ("first:9", ["stem", "blocks.0.dw", "blocks.0.grouped", "blocks.0.pw", "fc"]),
    ("conv", ["stem", "blocks.0.dw", "blocks.0.grouped", "blocks.0.pw"]), ("linear", ["fc"]),
    ("depthwise", ["blocks.0.dw"]), ("grouped", ["blocks.0.dw", "blocks.0.grouped"]),
    # early:F — the layers lying wholly within the first F of the 720 weights (288 = stem + depthwise)
    ("early:0.4", ["stem", "blocks.0.dw"]), ("early:0.39", ["stem"]), ("early:0.2", []),
    ("late:0.25", ["fc"]), ("late:0.5", ["blocks.0.pw", "fc"]),
    ("params<140", ["blocks.0.dw", "blocks.0.pw"]), ("params>200", ["stem"]), ("params<1e9", ["stem", "blocks.0.dw",
                                                                                                   "blocks.0.grouped", "blocks.0.pw", "fc"]),
    ("blocks.*", ["blocks.0.dw", "blocks.0.grouped", "blocks.0.pw"]), ("[c]onv", []), ("fc", ["fc"]),
])
def test_each_selector_selects_its_layers_in_graph_order(selector, names):
    assert select(small_graph(), [selector]) == {selector: names}


@pytest.mark.parametrize("selector, needle", [
    ("first:0", "'first:0' needs a whole number of layers ≥ 1, e.g. 'first:3'"),
    ("last:two", "'last:two' needs a whole number of layers"),
    ("early:1.5", "'early:1.5' needs a fraction F of the weights with 0 < F ≤ 1, e.g. 'early:0.1'"),
    ("late:", "'late:' needs a fraction F"), ("early:nan", "'early:nan' needs a fraction F"),
    ("params<lots", "'params<lots' needs a number of weights K ≥ 0"), ("params>-1", "'params>-1' needs a number of weights K ≥ 0"),
])
def test_a_malformed_selector_is_refused_when_the_recipe_is_read(selector, needle):
    with pytest.raises(RecipeError, match=re.escape(f"overrides[0]: layer selector {needle}")):
        resolve({"overrides": [{"layers": ["first", selector], "weights": {"bits": 6}}]})


def test_an_override_applies_to_the_union_of_its_selectors_and_the_last_override_wins():
    g = small_graph()
    r = resolve({"weights": {"bits": 4}, "overrides": [{"layers": ["depthwise", "last"], "weights": {"bits": 8}},
                                                       {"layers": "fc", "weights": {"bits": 6}}]})
    matches = override_matches(g, r["overrides"])
    assert matches == [["blocks.0.dw", "fc"], ["fc"]]
    bits = {op.name: layer_setting(r, "weights.bits", op.name, matches) for op in g.weighted_ops()}
    assert bits == {"stem": 4, "blocks.0.dw": 8, "blocks.0.grouped": 4, "blocks.0.pw": 4, "fc": 6}


def test_a_selector_that_selects_nothing_beside_others_is_silent_an_empty_override_is_not(capsys):
    g = small_graph()
    quiet = resolve({"overrides": [{"layers": ["depthwise", "params>1e6"], "weights": {"bits": 8}}]})
    check_override_patterns(g, quiet, strict=True)  # params>1e6 selects nothing: no mistake, nothing said
    assert capsys.readouterr().err == ""
    empty = resolve({"overrides": [{"layers": ["params>1e6", "late:0.01"], "weights": {"bits": 8}}]})
    check_override_patterns(g, empty, strict=False)
    err = capsys.readouterr().err
    assert err.startswith("warning: overrides[0] (layers params>1e6, late:0.01) selects no conv/linear layer of this "
                          "model; it changes nothing") and len(err.strip().splitlines()) == 1
    with pytest.raises(RecipeError, match=r"overrides\[0\] \(layers params>1e6, late:0.01\) selects no conv/linear layer"):
        check_override_patterns(g, empty, strict=True)
    glob = resolve({"overrides": [{"layers": ["depthwise", "[c]onv"], "weights": {"bits": 8}}]})
    check_override_patterns(g, glob, strict=False)  # a name glob that matches nothing is likely a typo: named
    assert "warning: overrides[0] layer pattern '[c]onv' matches no conv/linear layer" in capsys.readouterr().err


# ---------------------------------------------------------------- the shipped recipes on real architectures

MODELS = ["resnet18", "mobilenet_v2", "efficientnet_lite0", "resnet50"]


@lru_cache(maxsize=None)
def captured(name: str) -> Graph:
    """The model's graph as quantize captures it (EfficientNet-Lite0 with its real weights)."""
    from ptq.ir.capture import capture
    from ptq.models import load_model
    lm = load_model(name, None if name == "efficientnet_lite0" else "random")
    return capture(lm.module, lm.input_shape)


@pytest.mark.parametrize("model", MODELS)
def test_every_shipped_override_selects_layers_on_every_supported_model(model):
    g = captured(model)
    for name in builtin_names():
        r = resolve(name)
        for i, names in enumerate(override_matches(g, r["overrides"])):
            assert names, f"recipe {name} overrides[{i}] ({r['overrides'][i]['layers']}) selects nothing on {model}"
        check_override_patterns(g, r, strict=True)  # and `ptq quantize --strict` accepts the recipe


def test_the_multipoint_pins_select_the_same_lite0_layers_as_the_old_module_names():
    g = captured("efficientnet_lite0")
    before = {n for names in select(g, LITE0_NAMES_BEFORE).values() for n in names}
    assert len(before) == 28  # the stem, the first six blocks (18 layers) and the other 10 depthwise convs
    for recipe in ("multipoint", "multipoint-w3"):
        assert set(override_matches(g, resolve(recipe)["overrides"])[0]) == before, recipe


def test_the_multipoint_pins_on_resnet50_are_the_first_layer_and_the_first_two_percent_of_its_weights():
    g = captured("resnet50")
    pins = override_matches(g, resolve("multipoint")["overrides"])[0]
    assert pins == ["conv1"] + [f"layer1.{b}.{c}" for b in range(3) for c in ("conv1", "conv2", "conv3")
                                + (("downsample.0",) if b == 0 else ())] + ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.conv3"]
    assert "fc" not in pins


# ---------------------------------------------------------------- the manifest and the card say what each override selected


def test_the_card_lists_the_layers_each_override_selected_and_the_loader_checks_them(tmp_path):
    import json

    import ptq
    from benchmarks.reliability import tiny
    from ptq.errors import ManifestError
    from ptq.manifest import MANIFEST_FILE
    x = np.random.default_rng(0).normal(size=(16, 1, 8, 8)).astype(np.float32)
    over = [{"layers": ["last"], "weights": {"bits": 8}}, {"layers": ["depthwise", "params>100000"], "weights": {"bits": 6}}]
    qm = ptq.quantize(tiny(), x, {"method": "uniform", "weights": {"bits": 4}, "overrides": over}, eval_data=x[:8])
    assert qm.manifest.data["override_matches"] == [["fc"], []]
    card = qm.card()
    assert "| 0 | last | weights.bits = 8 | 1: fc |" in card and "| 1 | depthwise, params>100000 | weights.bits = 6 | none |" in card
    plain = ptq.quantize(tiny(), x, "w8a8", eval_data=x[:8])
    assert "override_matches" not in plain.manifest.data and "Layer overrides" not in plain.card()
    qm.save(tmp_path / "m")
    data = json.loads((tmp_path / "m" / MANIFEST_FILE).read_text())
    for bad, where in (([["fc"]], "'override_matches'"), ([["nope"], []], "'override_matches[0]'"),
                       ([["fc"], "fc"], "'override_matches[1]'")):
        (tmp_path / "m" / MANIFEST_FILE).write_text(json.dumps({**data, "override_matches": bad}))
        with pytest.raises(ManifestError, match=f"manifest field {re.escape(where)}"):
            ptq.manifest.load(tmp_path / "m")
