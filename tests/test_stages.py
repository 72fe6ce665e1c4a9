"""The quantize stages as a user sees them: verification and evaluation sized by the user (level 2
on a fixed sample or in full, evaluation skippable; the card and report.json say how much was
checked; the manifest does not change), one progress line per stage where stderr is not a
terminal, --quiet, and `ptq card` without torch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import ptq
from ptq.cli import main

STAGES = ("load and capture", "statistics", "method", "manifest", "bias correction", "verification")


@pytest.fixture(scope="module")
def data(digits, tmp_path_factory):
    """The digits model saved as a module file, with its calibration and evaluation tensors."""
    import torch
    model, xtr, _, xte, _ = digits
    d = tmp_path_factory.mktemp("stages")
    torch.save(model, d / "digits.pt")
    np.save(d / "calib.npy", xtr[:48])
    np.save(d / "eval.npy", xte[:16])
    return d


def _quantize(capsys, d, out, *extra):
    code = main(["quantize", str(d / "digits.pt"), "--trust-model-file", "--calib", str(d / "calib.npy"),
                 "--data", str(d / "eval.npy"), "--out", str(out), "--json", *extra])
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def default_run(data, tmp_path_factory):
    """A default quantize (fixed-sample verification, 16 evaluation samples) saved."""
    out = tmp_path_factory.mktemp("default") / "q"
    assert main(["quantize", str(data / "digits.pt"), "--trust-model-file", "--calib", str(data / "calib.npy"),
                 "--data", str(data / "eval.npy"), "--out", str(out), "--json"]) == 0
    return out


def test_default_verifies_a_fixed_sample_and_full_verifies_every_calibration_sample(data, default_run, tmp_path,
                                                                                     capsys, monkeypatch):
    level2 = json.loads((default_run / "report.json").read_text())["verification"]["level2"]
    assert level2 == {"mode": "sample", "samples": 32, "calibration_samples": 48}
    assert "the first 32 of 48 calibration samples, `--verify sample`" in (default_run / "card.md").read_text()

    monkeypatch.delenv("PTQ_NO_PROGRESS")  # --quiet alone must silence the stage lines
    code, cap = _quantize(capsys, data, tmp_path / "f", "--verify", "full", "--quiet")
    assert code == 0 and "ptq:" not in cap.err
    level2 = json.loads((tmp_path / "f" / "report.json").read_text())["verification"]["level2"]
    assert level2 == {"mode": "full", "samples": 48, "calibration_samples": 48}
    assert "all 48 calibration samples, `--verify full`" in (tmp_path / "f" / "card.md").read_text()
    assert ptq.load(tmp_path / "f").manifest.data["verification"]["numeric"]["samples"] == 48


def test_eval_size_zero_skips_evaluation_keeps_the_manifest_and_logs_one_line_per_stage(data, default_run, tmp_path,
                                                                                        capsys, monkeypatch):
    monkeypatch.delenv("PTQ_NO_PROGRESS")  # stderr under capsys is not a terminal: plain lines
    code, cap = _quantize(capsys, data, tmp_path / "z", "--eval-size", "0")
    assert code == 0 and json.loads(cap.out)["fidelity"] is None
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("ptq: ")]
    assert [ln[5:].rsplit("  ", 1)[0] for ln in lines] == [*STAGES, "evaluation"], lines
    assert lines[-1] == "ptq: evaluation  skipped (--eval-size 0)"
    assert all(ln.endswith(" s") for ln in lines[:-1]), lines
    report = json.loads((tmp_path / "z" / "report.json").read_text())
    assert report["fidelity"] is None and report["stage_seconds"]["evaluation"] == 0.0
    card = (tmp_path / "z" / "card.md").read_text()
    assert "Not measured: evaluation was skipped (`--eval-size 0`)" in card and "top1_agreement" not in card
    for f in ("manifest.json", "tensors.safetensors"):
        assert (tmp_path / "z" / f).read_bytes() == (default_run / f).read_bytes(), f


def test_negative_eval_size_and_unknown_verify_mode_are_refused(data, tmp_path, capsys):
    code, cap = _quantize(capsys, data, tmp_path / "n", "--eval-size", "-1")
    assert code == 2 and not (tmp_path / "n").exists()
    assert "must be a non-negative integer (0 skips evaluation); got -1" in cap.err
    with pytest.raises(ptq.PtqError, match="verify .--verify. must be one of sample, full; got 'most'"):
        ptq.quantize(data / "digits.pt", np.load(data / "calib.npy"), verify="most")


def test_card_prints_the_saved_card_without_importing_torch(default_run, tmp_path):
    probe = ("import sys; from ptq.cli import main; code = main(['card', sys.argv[1]]); "
             "sys.exit(10 + code if 'torch' in sys.modules else code)")
    res = subprocess.run([sys.executable, "-c", probe, str(default_run)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == (default_run / "card.md").read_text()
    (tmp_path / "x").mkdir()
    res = subprocess.run([sys.executable, "-m", "ptq", "card", str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode == 2 and "manifest.json is missing" in res.stderr and not res.stdout
