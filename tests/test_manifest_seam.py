"""The manifest is the only seam: a tool that imports just `ptq.manifest` loads and validates a
manifest of every scheme, and imports no method, runtime, exporter or API on the way."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import ptq

RECIPES = {"w4a8": "uniform", "multipoint": "multipoint", "swis": "swis", "bitplane": "bitplane", "acc16": "accumulator"}

PROBE = r"""
import json, sys
import ptq.manifest as pm
out = {}
for d in sys.argv[1:]:
    m = pm.load(d)
    pm.validate(m)
    w = m.weighted_ops()
    out[d] = {"schemes": sorted({op["weight"]["scheme"] for op in w}),
              "bitplanes": any("bitplanes" in op["weight"] for op in w),
              "accumulator_bits": sorted({op["accumulator"]["bits"] for op in w}),
              "points": max(len(op["weight"]["terms"]) for op in w),
              "mean_weight_bits": pm.weight_summary(m)["mean_weight_bits"]}
out["modules"] = sorted(n for n in sys.modules if n == "ptq" or n.startswith("ptq."))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):
    model, xtr, _, xte, _ = digits
    root = tmp_path_factory.mktemp("seam")
    dirs = {}
    for recipe in RECIPES:
        qm = ptq.quantize(model, xtr[:128], recipe, eval_data=xte[:32])
        dirs[recipe] = str(qm.save(root / recipe))
    return dirs


def test_manifest_package_alone_loads_and_validates_every_scheme(saved):
    res = subprocess.run([sys.executable, "-c", PROBE, *saved.values()], capture_output=True, text=True, check=True)
    out = json.loads(res.stdout)
    allowed = ("ptq.manifest", "ptq.ir", "ptq.errors", "ptq.version", "ptq.intmath", "ptq.bitserial", "ptq.accbound")
    loaded = [n for n in out["modules"] if n != "ptq"]
    assert all(n.startswith(allowed) for n in loaded), [n for n in loaded if not n.startswith(allowed)]
    assert not any(n.startswith(("ptq.methods", "ptq.runtime", "ptq.export", "ptq.api", "ptq.calib")) for n in loaded)
    got = {r: out[d] for r, d in saved.items()}
    assert got["w4a8"]["schemes"] == ["uniform"] and not got["w4a8"]["bitplanes"]
    assert got["multipoint"]["schemes"] == ["multipoint"] and got["multipoint"]["points"] >= 2
    assert got["swis"]["schemes"] == ["swis"]
    assert got["bitplane"]["schemes"] == ["uniform"] and got["bitplane"]["bitplanes"]
    assert got["acc16"]["accumulator_bits"] == [16]
    for r, d in saved.items():
        assert got[r]["mean_weight_bits"] == pytest.approx(ptq.load(d).summary()["mean_weight_bits"])


def test_a_tampered_scheme_field_is_refused_by_the_manifest_package_alone(saved, tmp_path):
    """The scheme rules live in the manifest package: a swis record whose shifts no longer cover its
    weights fails to load even when no method module was ever imported."""
    import shutil
    d = tmp_path / "swis"
    shutil.copytree(saved["swis"], d)
    data = json.loads((d / "manifest.json").read_text())
    w = next(op for op in data["graph"]["ops"] if "weight" in op)["weight"]
    w["cycles"] += 1
    (d / "manifest.json").write_text(json.dumps(data))
    probe = "import sys, ptq.manifest as pm\ntry:\n    pm.load(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)"
    res = subprocess.run([sys.executable, "-c", probe, str(d)], capture_output=True, text=True, check=True)
    assert res.stdout.startswith("ManifestError") and ".cycles" in res.stdout
