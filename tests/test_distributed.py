"""Calibration on several gloo ranks (calib/distributed.py): the statistics are the bits one process
computes and the manifest is the same bytes; only rank 0 writes; failures are reported once."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ptq
from ptq.api import prepare, quantize_prepared
from ptq.cli import main
from ptq.manifest import save

ROOT = Path(__file__).resolve().parent.parent
# 72 samples: 5 batches of 16 (the last of 8), split 2 + 3 over two ranks; 16 positions per image,
# so each conv's patch positions are drawn (a rank must skip the draws of the batches before its own);
# multipoint reads the Fisher sensitivity, so the ranks measure it too (2 batches, one each)
SETTINGS = dict(seed=5, eval_size=0, calibration__positions=16)


def _child_env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
            "PTQ_NO_PROGRESS": "1", **extra}


def test_two_gloo_ranks_give_the_statistics_and_manifest_of_one_process(digits, tmp_path):
    model, xtr, _, _, _ = digits
    # the coherent sensitivity: all four of its sums per channel are split over the ranks (the
    # diagonal one is the first of them)
    kw = dict(SETTINGS, calibration__sensitivity="coherent")
    two = prepare(model, xtr[:72], "multipoint", workers=2, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))  # each rank's share: BLAS rounding may depend on the thread count
    try:
        one = prepare(model, xtr[:72], "multipoint", **kw)
    finally:
        torch.set_num_threads(threads)
    assert (two.rank, two.ranks, one.ranks) == (0, 2, 1)
    a, b = two.stats, one.stats
    assert a._fisher is not None and b._fisher is None  # measured by both ranks, with the statistics
    assert a.ranges == b.ranges
    assert all(np.array_equal(a.histograms[t].counts, b.histograms[t].counts) for t in b.histograms)
    assert list(a.layer_inputs) == list(b.layer_inputs)
    for name, li in b.layer_inputs.items():
        assert a.layer_inputs[name].count == li.count
        assert np.array_equal(a.layer_inputs[name].xx, li.xx) and np.array_equal(a.layer_inputs[name].x, li.x), name
    assert a.pre_act_rows == b.pre_act_rows == 72 and a.pre_act_sums.keys() == b.pre_act_sums.keys()
    for name, (total, count) in b.pre_act_sums.items():
        assert a.pre_act_sums[name][1] == count and np.array_equal(a.pre_act_sums[name][0], total), name
    assert a.fisher.keys() == b.fisher.keys() and all(np.array_equal(a.fisher[k], b.fisher[k]) for k in b.fisher)
    qa, qb = quantize_prepared(two), quantize_prepared(one)
    assert qa.report["verification"]["verified"] and qa.report["calibration_ranks"] == 2
    da, db = save(qa.manifest, tmp_path / "two"), save(qb.manifest, tmp_path / "one")
    for f in ("manifest.json", "tensors.safetensors"):
        assert (da / f).read_bytes() == (db / f).read_bytes(), f


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ranks_other_than_0_write_and_print_nothing(digits, tmp_path, capsys, monkeypatch):
    """`ptq quantize` as torchrun starts it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): rank 1 in
    its own working directory with a relative --out, rank 0 in this process. Rank 1 exits 0 with
    nothing on stdout or stderr and nothing in its directory; rank 0 writes the output (verified)
    and prints one JSON object."""
    model, xtr, _, xte, _ = digits
    torch.save(model, tmp_path / "digits.pt")
    np.save(tmp_path / "calib.npy", xtr[:40])
    argv = ["quantize", str(tmp_path / "digits.pt"), "--trust-model-file", "--calib", str(tmp_path / "calib.npy"),
            "--eval-size", "0", "--out", "out", "--json"]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for d in ("rank0", "rank1"):
        (tmp_path / d).mkdir()
    rank1 = subprocess.Popen([sys.executable, "-m", "ptq", *argv], cwd=tmp_path / "rank1", env=_child_env(RANK="1", **env),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for k, v in {"RANK": "0", **env}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path / "rank0")
    code = main(argv)
    out, err = rank1.communicate(timeout=300)
    assert (code, rank1.returncode) == (0, 0), (capsys.readouterr().err, err)
    assert (out, err) == ("", "")
    assert list((tmp_path / "rank1").iterdir()) == []
    res = json.loads(capsys.readouterr().out)
    assert res["verified"] and res["out"] == "out"
    assert ptq.load(tmp_path / "rank0" / "out").report["calibration_ranks"] == 2


def test_a_failure_on_one_rank_is_reported_once_by_rank_0(digits, tmp_path, capsys):
    """`--workers 2`: a sample whose activations overflow lies in rank 1's batches only. Rank 0
    prints one line naming rank 1 and its error, exits 2, and writes nothing; rank 1 prints nothing."""
    model, xtr, _, _, _ = digits
    torch.save(model, tmp_path / "digits.pt")
    x = xtr[:48].copy()  # 3 batches: rank 0 streams batch 0, rank 1 batches 1 and 2
    x[40] = 3e38
    np.save(tmp_path / "calib.npy", x)
    code = main(["quantize", str(tmp_path / "digits.pt"), "--trust-model-file", "--calib", str(tmp_path / "calib.npy"),
                 "--eval-size", "0", "--workers", "2", "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and [line for line in lines if "error" in line] == [
        "error: rank 1 of 2: tensor relu became NaN/Inf on calibration data; check the data and the weights"]
    assert len(lines) == 2 and lines[0].startswith("warning: unpickling model file")  # rank 0's; rank 1 is muted
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two"])
def test_workers_must_be_a_positive_integer(value, tmp_path, capsys):
    code = main(["quantize", "efficientnet_lite0", "--workers", value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--workers" in err and "positive integer" in err and repr(value if value in ("1.5", "two") else int(value)) in err
    assert not (tmp_path / "o").exists()


def test_workers_under_torchrun_is_refused(monkeypatch, capsys, tmp_path):
    """torchrun started the ranks: --workers would start more; refused before any rank joins."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ptq.PtqError, match=r"under torchrun \(or in a process with a torch.distributed group\) leave it out"):
        ptq.quantize("efficientnet_lite0", workers=2)
    with pytest.raises(ptq.PtqError, match="workers .* must be a positive integer"):
        ptq.quantize("efficientnet_lite0", workers=True)
