"""Property tests of the command line: generated bad manifests and bad numeric options end in exit
0, 2 (a user error, one line) or 3 (not verified) — never 1 (an internal error) and never a traceback."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from ptq.cli import main

ALLOWED = (0, 2, 3)
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base(digits_quantized, tmp_path_factory):
    """A saved digits manifest, its JSON and every path inside it, and a small data file."""
    _, d = digits_quantized
    data = json.loads((Path(d) / "manifest.json").read_text())
    paths = []

    def walk(v, path):
        paths.append(path)
        if isinstance(v, dict):
            for k in sorted(v):
                walk(v[k], path + (k,))
        elif isinstance(v, list):
            for i, x in enumerate(v[:3]):
                walk(x, path + (i,))

    walk(data, ())
    root = tmp_path_factory.mktemp("fuzz")
    x = root / "x.npy"
    np.save(x, np.random.default_rng(0).normal(size=(4, 1, 8, 8)).astype(np.float32))
    return Path(d), data, [p for p in paths if p and p[0] != "tensors"], x, root


REPLACEMENTS = st.sampled_from([None, "x", "", -1, 0, 1, 2**40, -2**40, 1e308, -0.5, True, [], {}, [1, "a"],
                                {"a": 1}, "../../etc/passwd", "os:abort"])


def run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refusing a value: its usage line and one error line, exit 2
        code = exc.code
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def mutate(data: dict, path: tuple, how: str, value):
    out = json.loads(json.dumps(data))
    parent = out
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if how == "delete":
        if isinstance(parent, list):
            parent.pop(key)
        else:
            parent.pop(key)
    else:
        parent[key] = value
    return out


@FUZZ
@given(idx=st.integers(min_value=0), how=st.sampled_from(["delete", "retype"]), value=REPLACEMENTS,
       command=st.sampled_from(["inspect", "card", "simulate", "export"]))
def test_a_mutated_manifest_field_is_refused_or_harmless(base, capsys, idx, how, value, command):
    src, data, paths, x, root = base
    path = paths[idx % len(paths)]
    d = root / "m"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, d)
    (d / "manifest.json").write_text(json.dumps(mutate(data, path, how, value)))
    argv = {"inspect": ["inspect", str(d), "--json"], "card": ["card", str(d)],
            "simulate": ["simulate", str(d), "--data", str(x), "--size", "4"],
            "export": ["export", str(d), "--out", str(root / "m.onnx")]}[command]
    code, text = run(capsys, argv)
    where = f"{how} {'.'.join(map(str, path))} = {value!r}, {command}"
    assert code in ALLOWED, f"{where}: exit {code}: {text[-400:]}"
    assert "Traceback" not in text and "internal error" not in text, where
    if code == 2:
        assert len([ln for ln in text.splitlines() if ln.strip()]) == 1, f"{where}: {text}"


NUMBERS = st.one_of(st.integers(min_value=-2**40, max_value=2**40).map(str),
                    st.sampled_from(["nan", "inf", "-inf", "1e400", "0.5", "-0", "", "x", "0x10", "1_000"]))


@settings(max_examples=12, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(option=st.sampled_from(["--size", "--seed", "--accumulator-bits"]), value=NUMBERS)
def test_simulate_numeric_options(base, capsys, option, value):
    src, _, _, x, _ = base
    code, text = run(capsys, ["simulate", str(src), "--data", str(x), "--size", "4", option, value])
    assert code in ALLOWED, f"{option} {value!r}: exit {code}: {text[-400:]}"
    assert "Traceback" not in text and "internal error" not in text


@settings(max_examples=12, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(option=st.sampled_from(["--calib-size", "--eval-size", "--seed", "--set accumulator.bits=",
                               "--set calibration.batch_size=", "--set activations.percentile=",
                               "--set multipoint.budget=", "--input-shape"]), value=NUMBERS)
def test_quantize_numeric_options(base, capsys, tmp_path, option, value):
    _, _, _, x, _ = base
    argv = ["quantize", "benchmarks.reliability:tiny", "--calib", str(x), "--data", str(x), "--out", str(tmp_path / "o"),
            "--recipe", "multipoint" if "multipoint" in option else "w8a8"]
    argv += [option.split()[0], option.split()[1] + value] if option.startswith("--set") else [option, value]
    code, text = run(capsys, argv)
    assert code in ALLOWED, f"{option} {value!r}: exit {code}: {text[-400:]}"
    assert "Traceback" not in text and "internal error" not in text
    if code == 0:
        assert (tmp_path / "o" / "manifest.json").is_file()


def test_the_fuzzer_reaches_deep_fields(base):
    """The generated paths cover the graph's weighted records and the header, not only top-level keys."""
    _, _, paths, _, _ = base
    joined = {".".join(map(str, p)) for p in paths}
    assert any(p.endswith("accumulator.mode") for p in joined)
    assert "model.kind" in joined and "recipe.weights.clip" in joined
    assert not math.isnan(len(paths)) and len(paths) > 100
