"""A user's own model, as a new user meets it: a factory in the current directory, a factory that
builds a different model each time, the input shape taken from tensor calibration data, default
sample data at the manifest's input shape, and one-line hints when data do not fit."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import ptq
from ptq.cli import main
from ptq.manifest import MANIFEST_FILE, TENSOR_FILE

NET = "ptq_newuser_net"  # written into the test's working directory, which is not on sys.path
NET_SOURCE = """
import random
import torch
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def unseeded():
    model = build()
    with torch.no_grad():
        model[0].bias.add_(random.random())  # Python's own generator, which ptq's seed does not reach
    return model
"""
EVIL = "ptq_newuser_evil"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The user's folder, as the working directory: their model code and 16×16 RGB calibration
    tensors. Neither it nor '' is on sys.path (as for the `ptq` console script)."""
    (tmp_path / f"{NET}.py").write_text(NET_SOURCE)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(24, 3, 16, 16)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    yield tmp_path
    for name in (NET, EVIL):
        sys.modules.pop(name, None)


def test_quantize_a_factory_from_the_current_directory_with_the_shape_of_its_data(project, capsys):
    code, out, err = run(capsys, "quantize", f"{NET}:build", "--calib", "calib.npy", "--out", "out", "--json")
    assert code == 0, err
    model = ptq.load("out").manifest.data["model"]
    assert model["input_shape"] == [3, 16, 16]  # from the data: no --input-shape
    assert model["preprocess"]["size"] == 16 and re.fullmatch(r"[0-9a-f]{64}", model["state_sha256"])
    # simulate and eval default to sample crops at the manifest's 16×16, and the state hash ties the model
    code, out, err = run(capsys, "simulate", "out", "--size", "8", "--json")
    assert code == 0 and json.loads(out)["data"] == "samples:eval", err
    code, out, err = run(capsys, "eval", "out", "--model", f"{NET}:build", "--size", "8", "--json")
    assert code == 0 and json.loads(out)["samples"] == 8 and "warning" not in err, err


def test_a_factory_name_read_from_a_manifest_is_never_imported_from_the_current_directory(project, capsys):
    assert run(capsys, "quantize", f"{NET}:build", "--calib", "calib.npy", "--out", "out")[0] == 0
    marker = project / "imported"
    (project / f"{EVIL}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                        "def make():\n    pass\n")
    hostile = project / "hostile"
    hostile.mkdir()
    shutil.copy(project / "out" / TENSOR_FILE, hostile / TENSOR_FILE)
    data = json.loads((project / "out" / MANIFEST_FILE).read_text())
    data["model"]["name"] = f"{EVIL}:make"
    (hostile / MANIFEST_FILE).write_text(json.dumps(data))
    code, _, err = run(capsys, "eval", "hostile", "--data", "calib.npy")
    assert code == 2 and f"--model '{EVIL}:make'" in one_line(err)
    assert not marker.exists() and EVIL not in sys.modules


def test_a_missing_factory_module_says_where_ptq_looks(project, capsys):
    code, _, err = run(capsys, "quantize", "nosuchnet:build", "--calib", "calib.npy", "--out", "out")
    assert code == 2 and ("No module named 'nosuchnet'; run ptq in the folder that holds nosuchnet.py (or the nosuchnet "
                          "package), or add that folder to PYTHONPATH") in one_line(err)
    assert not (project / "out").exists()


def test_eval_refuses_a_factory_that_builds_a_different_model_each_time(project, capsys):
    code, _, err = run(capsys, "quantize", f"{NET}:unseeded", "--calib", "calib.npy", "--out", "out")
    assert code == 0, err
    code, out, err = run(capsys, "eval", "out", "--model", f"{NET}:unseeded", "--data", "calib.npy")
    assert code == 2 and out == ""
    assert one_line(err) == (f"error: the factory {NET}:unseeded builds a different model each time (its state differs "
                             "from the one this manifest was quantized from): seed it or pass --weights")


def test_data_that_do_not_fit_the_manifest_name_the_shape_and_the_flags(project, capsys):
    np.save("gray.npy", np.random.default_rng(1).normal(size=(16, 1, 8, 8)).astype(np.float32))
    code, _, err = run(capsys, "quantize", "benchmarks.reliability:tiny", "--calib", "gray.npy", "--out", "gray")
    assert code == 0, err
    code, _, err = run(capsys, "simulate", "gray", "--size", "4")  # the default data, photos, cannot be 1×8×8
    assert code == 2 and ("bundled photos are preprocessed to (3, 224, 224) (imagenet) but the model takes (1, 8, 8): give "
                          "--calib/--data a .npy/.pt tensor of shape (N, 1, 8, 8), or quantize with --input-shape 3,224,224 "
                          "if the model takes such images") in one_line(err)
    code, _, err = run(capsys, "eval", "gray", "--model", "benchmarks.reliability:tiny", "--data", "calib.npy")
    assert code == 2 and ("calib.npy has shape (24, 3, 16, 16); the model expects (N, 1, 8, 8); give --calib/--data a "
                          "tensor of that shape, or quantize with --input-shape 3,16,16") in one_line(err)
    from benchmarks.reliability import tiny
    ptq.quantize(tiny(), np.load("gray.npy"), "w8a8").save("in-memory")
    code, _, err = run(capsys, "simulate", "in-memory", "--size", "4")
    assert code == 2 and ("this model has no image preprocessing (an in-memory model): give "
                          "--calib/--data a .npy/.pt tensor of shape (N, 1, 8, 8)") in one_line(err)


def test_a_manifest_whose_recorded_crop_predates_its_input_shape_still_simulates_on_samples(project, capsys):
    assert run(capsys, "quantize", f"{NET}:build", "--calib", "calib.npy", "--out", "out")[0] == 0
    data = json.loads((project / "out" / MANIFEST_FILE).read_text())
    data["model"]["preprocess"].update(size=224, resize=256)  # as ptq recorded it before the crop followed the shape
    (project / "out" / MANIFEST_FILE).write_text(json.dumps(data))
    code, out, err = run(capsys, "simulate", "out", "--size", "4", "--json")
    assert code == 0 and json.loads(out)["verified"] is True, err
