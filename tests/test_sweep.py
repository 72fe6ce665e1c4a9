"""`ptq sweep`: budgets reach recipes through budget_key, one calibration pass, JSON + PNG, errors."""
import json

import pytest
import torch

from ptq.cli import main
from ptq.errors import RecipeError
from ptq.recipe import resolve
from ptq.sweep import budget_overrides, parse_budgets, sweep


def test_budget_keys_map_budgets_declaratively():
    assert budget_overrides(resolve("w4a8"), 3) == {"weights.bits": 3}
    assert budget_overrides(resolve("multipoint"), 6) == {"multipoint.budget": 1.5}  # 4-bit points × 1.5
    assert budget_overrides(resolve("multipoint-w3"), 4.5) == {"multipoint.budget": 1.5}
    with pytest.raises(RecipeError, match="not a whole number"):
        budget_overrides(resolve("w4a8"), 3.5)
    with pytest.raises(RecipeError, match="between"):
        budget_overrides(resolve("multipoint"), 3)  # 0.75 points per channel < 1
    with pytest.raises(RecipeError, match="budget_key names 'weights.bitz'"):
        resolve("w8a8", {"budget_key": "weights.bitz"})


@pytest.mark.parametrize("text", ["", "abc", "3,x", "0,4", "4,40", "nan"])
def test_bad_budgets_rejected(text):
    with pytest.raises(Exception, match="--budgets must be"):
        parse_budgets(text)


def test_sweep_digits(digits, tmp_path, capsys):
    model, xtr, _, xte, _ = digits
    calib = torch.from_numpy(xtr[:128])
    res = sweep(model, ["w4a8", "multipoint"], [3, 3.5, 4, 6, 8], calib=calib, eval_data=xte[:128],
                calib_size=128, eval_size=128)
    assert res["calibration_passes"] == 1
    pts = {(p["recipe"], p["budget"]): p for p in res["points"]}
    assert set(pts) == {("w4a8", 3), ("w4a8", 4), ("w4a8", 6), ("w4a8", 8), ("multipoint", 4), ("multipoint", 6),
                        ("multipoint", 8), ("uniform", 3), ("uniform", 4), ("uniform", 6), ("uniform", 8)}
    skipped = {(s["recipe"], s["budget"]) for s in res["skipped"]}
    assert skipped == {("w4a8", 3.5), ("multipoint", 3), ("multipoint", 3.5)}
    for p in res["points"]:
        assert p["verified"] and {"top1_agreement", "top5_agreement", "kl", "sqnr_db", "mean_weight_bits"} <= set(p)
    # uniform everywhere at b bits: exactly b mean weight bits; more bits never far worse
    for b in (3, 4, 6, 8):
        assert pts[("uniform", b)]["mean_weight_bits"] == pytest.approx(b)
    uni = [pts[("uniform", b)] for b in (3, 4, 6, 8)]
    assert all(hi["top1_agreement"] >= lo["top1_agreement"] - 2 for lo, hi in zip(uni, uni[1:]))
    assert uni[-1]["top1_agreement"] >= 95 and uni[-1]["kl"] < uni[0]["kl"]
    assert pts[("multipoint", 8)]["mean_weight_bits"] > pts[("multipoint", 4)]["mean_weight_bits"]


def test_cli_sweep_writes_json_and_png(digits, tmp_path, capsys):
    import numpy as np
    model, xtr, _, xte, _ = digits
    torch.save(model, tmp_path / "digits.pt")
    np.save(tmp_path / "calib.npy", xtr[:64])
    np.save(tmp_path / "eval.npy", xte[:64])
    peers = tmp_path / "peers.json"
    peers.write_text(json.dumps({"rows": [{"name": "peer W8A8", "mean_weight_bits": 8.0, "top1_agreement": 97.0, "kl": 0.01}]}))
    out = tmp_path / "sw"
    code = main(["sweep", str(tmp_path / "digits.pt"), "--recipe", "w4a8", "--budgets", "4,8", "--calib",
                 str(tmp_path / "calib.npy"), "--data", str(tmp_path / "eval.npy"), "--eval-size", "64", "--input-shape", "1,8,8",
                 "--trust-model-file", "--peers", str(peers), "--out", str(out), "--json"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    res = json.loads(cap.out)
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["points"] == res["points"] and len(res["points"]) == 4 and saved["peers"][0]["name"] == "peer W8A8"
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, needle", [
    (["--budgets", "3,abc"], "--budgets must be"),
    (["--budgets", "4", "--recipe", "nope"], "unknown recipe 'nope'"),
])
def test_cli_sweep_errors(capsys, tmp_path, argv, needle):
    code = main(["sweep", "resnet18", "--weights", "random", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_peers_from_the_benchmark_json_are_named_and_filtered(tmp_path):
    """`benchmarks.run --out-json` output can be overlaid as is: ptq's rows, rows of other models and
    failed rows are left out, the rest are named by tool and configuration."""
    from ptq.errors import PtqError
    from ptq.sweep import load_peers, peers_for
    rows = [{"model": "m1", "tool": "onnxruntime", "config": "MinMax W8A8", "mean_weight_bits": 8.0, "top1_agreement": 88.0},
            {"model": "m1", "tool": "ptq", "config": "w8a8", "mean_weight_bits": 8.0, "top1_agreement": 94.0},
            {"model": "m2", "tool": "brevitas", "config": "W8A8", "mean_weight_bits": 8.0, "top1_agreement": 99.0},
            {"model": "m1", "tool": "brevitas", "config": "W4A8 GPTQ", "error": "RuntimeError: x"}]
    p = tmp_path / "peer.json"
    p.write_text(json.dumps({"rows": rows}))
    assert [r["name"] for r in peers_for(load_peers(p), "m1")] == ["onnxruntime MinMax W8A8"]
    assert [r["name"] for r in load_peers(p)] == ["onnxruntime MinMax W8A8", "brevitas W8A8"]
    assert peers_for(load_peers(p), "m3") == []
    p.write_text(json.dumps({"rows": rows[1:2]}))
    with pytest.raises(PtqError, match="no peer rows"):
        load_peers(p)
