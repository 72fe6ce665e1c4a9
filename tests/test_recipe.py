import numpy as np
import pytest

from ptq.errors import RecipeError
from ptq.ir import Graph, Op
from ptq.methods.selectors import override_matches
from ptq.recipe import builtin_names, layer_setting, parse_value, resolve


def test_builtin_recipes_load_from_the_package():
    assert {"w8a8", "w4a8"} <= set(builtin_names())
    r = resolve("w4a8")
    assert r["weights"]["bits"] == 4 and r["activations"]["bits"] == 8
    # every default is written out
    assert r["calibration"]["size"] == 128 and "observer" in r["activations"]


def test_overrides_and_layer_globs():
    g = Graph("x", (3, 8, 8), [Op(n, "conv", ["x"], n, {"groups": 1}, np.zeros((4, 3, 1, 1), np.float32))
                               for n in ("conv1", "layer1.0.conv1", "fc")], ["fc"])
    r = resolve("w4a8", {"weights.bits": 3, "activations.observer": "percentile"})
    assert r["weights"]["bits"] == 3 and r["activations"]["observer"] == "percentile"
    matches = override_matches(g, r["overrides"])
    assert layer_setting(r, "weights.bits", "conv1", matches) == 8
    assert layer_setting(r, "weights.bits", "fc", matches) == 8
    assert layer_setting(r, "weights.bits", "layer1.0.conv1", matches) == 3
    r = resolve({"overrides": [{"layers": "layer1.*", "weights": {"bits": 6}}]})
    assert layer_setting(r, "weights.bits", "layer1.0.conv1", override_matches(g, r["overrides"])) == 6


@pytest.mark.parametrize("over,msg", [
    ({"weights.bitz": 4}, "did you mean 'weights.bits'"),
    ({"weights.bits": 9}, "between 2 and 8"),
    ({"activations.observer": "magic"}, "one of"),
    ({"method": "unifrom"}, "did you mean 'uniform'"),
    ({"calibraton.size": 3}, "calibration"),
])
def test_bad_keys_and_values_are_named(over, msg):
    with pytest.raises(RecipeError, match=msg):
        resolve("w8a8", over)


def test_unknown_recipe_name_suggests():
    with pytest.raises(RecipeError, match="w8a8"):
        resolve("w8a9")


def test_parse_value():
    assert parse_value("4") == 4 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("mse") == "mse" and parse_value('"x"') == "x"


@pytest.mark.parametrize("over,names", [({"weights.rounding": "feedback"}, "weights.rounding = 'feedback'"),
                                        ({"weights.clip": "output"}, "method 'uniform'"),
                                        ({"overrides": [{"layers": "first", "weights": {"rounding": "learned"}}]},
                                         "weights.rounding = 'learned'")])
def test_a_recipe_that_skips_the_layer_moments_but_reads_them_is_refused(over, names):
    with pytest.raises(RecipeError, match=f"calibration.layer_moments = false, but {names}"):
        resolve("w8a8-fast", over)
    with pytest.raises(RecipeError, match="method 'bitplane'"):
        resolve("bitplane", {"calibration.layer_moments": False, "weights.rounding": "nearest"})
    assert resolve("w8a8-fast")["calibration"]["layer_moments"] is False
