"""Verdicts: `ptq quantize` calls done only a manifest that verifies and that its own loader accepts.

A manifest that does not verify is still written (for inspection), but the run exits 3 and names
the failing check.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

import ptq
from ptq.cli import main
from ptq.runtime.verify import failure_reason


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def digits_files(digits, tmp_path_factory):
    model, xtr, _, xte, _ = digits
    d = tmp_path_factory.mktemp("digits")
    torch.save(model.state_dict(), d / "digits_state.pt")  # the architecture by factory: nothing unpickled
    np.save(d / "calib.npy", xtr[:64])
    np.save(d / "eval.npy", xte[:16])
    return d


def test_quantize_that_does_not_verify_exits_3_keeps_the_output_and_names_the_check(digits_files, tmp_path):
    """8-bit accumulators on the digits CNN: every layer's data-free bound exceeds them (level 1)."""
    d, out = digits_files, tmp_path / "acc8"
    code, stdout, err = cli("quantize", "benchmarks.digits:DigitsNet", "--weights", str(d / "digits_state.pt"), "--input-shape", "1,8,8", "--calib", str(d / "calib.npy"),
                            "--data", str(d / "eval.npy"), "--eval-size", "16", "--set", "accumulator.bits=8",
                            "--out", str(out), "--json")
    assert code == 3, err
    res = json.loads(stdout)
    assert res["verified"] is False and res["out"] == str(out)
    assert res["reason"].startswith("level 1: the data-free accumulator bound exceeds the declared width in stem.0 (")
    assert "> 8 bits)" in res["reason"]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    line = " ".join(err.split())
    assert line.startswith("NOT verified: level 1: the data-free accumulator bound") and f"kept for inspection in {out}" in line
    assert ptq.load(out).manifest.data["verification"]["structural"]["ok"] is False  # kept, and loadable
    # the human verdict names the check too
    code, _, err = cli("quantize", "benchmarks.digits:DigitsNet", "--weights", str(d / "digits_state.pt"), "--input-shape", "1,8,8", "--calib", str(d / "calib.npy"),
                       "--data", str(d / "eval.npy"), "--eval-size", "16", "--set", "accumulator.bits=8",
                       "--out", str(out), "--force")
    assert code == 3 and "NOT verified: level 1: the data-free accumulator bound" in " ".join(err.split())


def test_quantize_help_documents_exit_code_3(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "3 written but NOT verified" in " ".join(capsys.readouterr().out.split())


def test_simulate_names_overflows_as_the_failing_check(digits_quantized, digits_files):
    _, out = digits_quantized
    code, stdout, err = cli("simulate", str(out), "--data", str(digits_files / "eval.npy"), "--accumulator", "wrap",
                            "--accumulator-bits", "12", "--json")
    res = json.loads(stdout)
    assert code == 3 and res["verified"] is False and res["overflows"] > 0
    assert f"{res['overflows']} accumulator overflow(s) in " in res["reason"]


LEVEL1 = {"problem": None, "layers": {"a": {"data_free_bits": 17, "accumulator_bits": 16, "data_free_ok": False},
                                      "b": {"data_free_bits": 12, "accumulator_bits": 16, "data_free_ok": True}}}
LEVEL2 = {"min_share_within_1lsb": 0.98, "worst_tensor": "relu_3", "top1_agreement_decisive": 90.0, "decisive_samples": 30}


def test_failure_reason_names_every_failing_check_with_its_numbers():
    reason = failure_reason({**LEVEL1, "problem": "manifest field 'x' is bad"}, LEVEL2,
                            {"a": {"overflows": 4}, "b": {"overflows": 0}})
    assert reason.split("; ") == [
        "level 1: manifest field 'x' is bad",
        "level 1: the data-free accumulator bound exceeds the declared width in a (17 > 16 bits)",
        "level 2: 98.00% of tensor relu_3 is within 1 LSB of the reference (needs 99.9%)",
        "level 2: top-1 agreement with the reference on the 30 decisive samples is 90.0% (needs 99.5%)",
        "4 accumulator overflow(s) in a (4)"]
    ok2 = {**LEVEL2, "min_share_within_1lsb": 1.0, "top1_agreement_decisive": 100.0}
    assert failure_reason(LEVEL1, ok2) == "level 1: the data-free accumulator bound exceeds the declared width in a (17 > 16 bits)"
