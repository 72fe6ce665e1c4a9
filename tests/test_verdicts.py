"""Verdicts: `ptq quantize` calls done only a manifest that verifies and that its own loader accepts.

A manifest that does not verify is still written (for inspection), but the run exits 3 and names
the failing check; no shared step of the builder may leave a weight its scheme cannot represent.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

import ptq
from ptq import bitserial
from ptq.cli import main
from ptq.manifest.build import BIAS_HEADROOM, INT32_MAX, fit_bias_scale
from ptq.runtime.verify import embedding_end_to_end, failure_reason


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


def test_a_sentence_embedding_model_is_judged_by_its_pooled_embeddings():
    """Level 2 end to end for an encoder: the least per-sample cosine of pooled embeddings, not top-1."""
    level2 = {"min_share_within_1lsb": 1.0, "worst_tensor": "h", "embedding_cosine_min": 0.91, "embedding_cosine_mean": 0.97}
    assert failure_reason({**LEVEL1, "layers": {}}, level2) == \
        "level 2: the least sentence-embedding cosine with the reference is 0.910000 (needs 0.95)"
    assert failure_reason({**LEVEL1, "layers": {}}, {**level2, "embedding_cosine_min": 0.96}) == ""
    x = np.zeros((2, 3, 2), np.float32)
    x[:, :2, 1] = 1  # two kept tokens each; the third (padding) must not count
    hidden = np.random.default_rng(0).normal(size=(2, 3, 4))
    other = hidden.copy()
    other[:, 2] += 100.0
    r = embedding_end_to_end(hidden, other, x)
    assert r["embedding_cosine_min"] == pytest.approx(1.0) and r["embedding_cosine_mean"] == pytest.approx(1.0)
    other[0, 0] = -other[0, 0]
    assert embedding_end_to_end(hidden, other, x)["embedding_cosine_min"] < 0.9


# ---------------------------------------------------------------- near-dead channels (int32 bias fit)

DEAD = 3


class NearDead(nn.Module):
    """Digits-sized convs whose middle layer has one channel with weights ~1e-6 and a bias of 1: its
    bias does not fit int32 at the method's scale, so the builder must raise that channel's scale."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.c2.weight[DEAD] = torch.randn_like(self.c2.weight[DEAD]) * 1e-6
            self.c2.bias[DEAD] = 1.0

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture(scope="module")
def digit_images():
    from benchmarks.digits import digits_data
    xtr, _, xte, _ = digits_data()
    return xtr, xte


@pytest.mark.parametrize("recipe", ["w4a8", "w4a8-learned", "multipoint", "swis", "bitplane", "bitplane-4.5", "bitplane-4.5-learned",
                                    "acc16"])
def test_a_near_dead_channel_stays_on_its_schemes_grid(recipe, digit_images, tmp_path):
    xtr, xte = digit_images
    # the channel's scale and grid do not depend on how long the learned rounding runs: 100 steps, not 1000
    over = {"rounding.iterations": 100} if recipe.endswith("-learned") else {}
    qm = ptq.quantize(NearDead().eval(), xtr[:32], recipe, eval_data=xte[:8], eval_size=8, overrides=over)
    v = qm.report["verification"]
    assert v["verified"] is True and v["reason"] is None, v["reason"]
    loaded = ptq.load(qm.save(tmp_path / recipe)).manifest  # the loader's every check, each scheme's rules included
    op = next(o for o in loaded.weighted_ops() if o["name"] == "c2")
    scale = loaded.tensor(op["weight"]["terms"][0]["scale"])[DEAD]
    if recipe == "acc16":  # the method fits the channel to its 16-bit bound itself, with a step the bias fits
        s_x = loaded.encoding(op["inputs"][0])["scale"]
        assert op["bias"]["saturated"] == 0
        assert int(loaded.tensor(op["bias"]["q"])[DEAD]) * s_x * scale == pytest.approx(1.0, abs=s_x * scale)
        return
    floor = 1.0 * BIAS_HEADROOM / (loaded.encoding(op["inputs"][0])["scale"] * INT32_MAX)
    assert scale == pytest.approx(floor, rel=1e-12)  # raised so that the bias fits int32
    q = loaded.tensor(op["weight"]["terms"][0]["q"])
    w = op["weight"]
    if w["scheme"] != "swis":
        assert np.abs(q[DEAD]).max() > 0  # re-rounded on the scheme's grid, not dropped
    else:  # the nearest values of sets without low positions are zeros here
        shifts = loaded.tensor(w["extra"]["shifts"])
        assert not bitserial.unrepresentable(q, shifts, w["group"]).any()
        assert loaded.data["method_info"]["swis"]["cycles"] == sum(o["weight"]["cycles"] for o in loaded.weighted_ops())


# ---------------------------------------------------------------- channels the calibration data never opens

UNSEEN = 2


class Unseen(nn.Module):
    """A stem whose channel UNSEEN sums its input with positive weights, so after the ReLU it is zero on
    negative images and open on positive ones, then a depthwise conv: calibrated on negative images,
    the depthwise channel's input moments are all zero, and its output error is 0 for any weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.stem.weight.copy_(-self.stem.weight.abs())  # open on negative images
            self.stem.weight[UNSEEN] = self.stem.weight[UNSEEN].abs()  # open on positive ones only

    def forward(self, x):
        x = torch.relu(self.pw(torch.relu(self.dw(torch.relu(self.stem(x))))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("recipe", ["w4a8", "multipoint", "swis", "bitplane-4.5", "acc16"])
def test_a_channel_the_calibration_data_never_opens_keeps_its_weights(recipe, digit_images):
    """Its output error cannot choose a clip (every candidate's is 0): chosen by weight error, the
    depthwise channel is its weights on the layer's grid, not clipped to the first ratio searched
    (a quarter of its largest weight at 4 bits), which wrecked it for images that do open it."""
    xtr, xte = digit_images
    calib = -np.abs(xtr[:32]) - 0.1  # negative images: the channel's stem output is zero on every one
    qm = ptq.quantize(Unseen().eval(), calib, recipe, eval_data=np.abs(xte[:8]), eval_size=8)
    assert qm.report["verification"]["verified"] is True
    m = qm.manifest
    rec = next(o for o in m.weighted_ops() if o["name"] == "dw")
    term = rec["weight"]["terms"][0]
    w = Unseen().dw.weight.detach().numpy().reshape(4, -1)[UNSEEN].astype(np.float64)
    what = m.tensor(term["q"]).reshape(4, -1)[UNSEEN] * m.tensor(term["scale"])[UNSEEN]
    assert np.sum((w - what) ** 2) < 0.05 * np.sum(w ** 2)


def test_a_weight_its_scheme_cannot_represent_is_not_verified_and_named(digit_images, tmp_path, monkeypatch):
    """Were a shared step to round a SWIS channel plainly (the rule before), quantize runs the
    loader's validation on what it built, exits 3 and names the weight and its group's set."""
    from ptq.ir import grids
    monkeypatch.setattr(grids.SwisGrid, "project", grids.Grid.project)
    xtr, xte = digit_images
    torch.save(NearDead().eval(), tmp_path / "near_dead.pt")
    np.save(tmp_path / "calib.npy", xtr[:32])
    np.save(tmp_path / "eval.npy", xte[:8])
    out = tmp_path / "out"
    code, stdout, err = cli("quantize", str(tmp_path / "near_dead.pt"), "--trust-model-file", "--input-shape", "1,8,8", "--recipe", "swis",
                            "--calib", str(tmp_path / "calib.npy"), "--data", str(tmp_path / "eval.npy"),
                            "--eval-size", "8", "--out", str(out), "--json")
    res = json.loads(stdout)
    assert code == 3 and res["verified"] is False, err
    assert res["reason"].startswith(f"level 1: manifest field 'graph.ops[1].weight.terms[0].q': weight [{DEAD}, ")
    assert "is not representable by its group's shift set" in res["reason"]
    with pytest.raises(ptq.errors.ManifestError, match="is not representable by its group's shift set"):
        ptq.load(out)  # the kept output is what the loader refuses, and the verdict said so


def test_bias_fit_maps_a_swis_channel_onto_its_groups_shift_sets():
    """The scale rise re-rounds channel 0 to q·ratio ≈ (12.9, 5.4, 1.1, ...); plain rounding (13, 5, 1)
    is not on the set {8, 32, 64} of its group, the nearest values (8, 8, 0) are."""
    from ptq.ir import WeightQuant
    mask = 0b1101000
    q = np.zeros((2, 1, 1, 8), np.int64)
    q[0, 0, 0, :3] = (96, 40, 8)
    q[1, 0, 0, :2] = (64, 32)
    shifts = np.full((2, 1), mask, np.int32)
    summary, order = bitserial.layer_schedule(q, 8, 16, 3, 8)
    wq = WeightQuant({"scheme": "swis", "bits": 8, "group": 8, "shared_bits": 3, **summary},
                     [(q, np.array([1e-9, 1.0]))], 5.125, {"shifts": shifts, "order": order.astype(np.int32)})
    fit_bias_scale(wq, np.array([1.0, 0.0]), 1.0)
    q2, s2 = wq.terms[0]
    ratio = 1e-9 / (16 / INT32_MAX)
    assert s2[0] == 16 / INT32_MAX and s2[1] == 1.0
    assert np.allclose(q[0, 0, 0, :3] * ratio, [12.9, 5.37, 1.07], atol=0.02)
    assert q2[0, 0, 0].tolist() == [8, 8, 0, 0, 0, 0, 0, 0] and np.array_equal(q2[1], q[1])
    assert not bitserial.unrepresentable(q2, shifts, 8).any()
    recount, new_order = bitserial.layer_schedule(q2, 8, 16, 3, 8)
    assert {k: wq.scheme[k] for k in recount} == recount and np.array_equal(wq.extra["order"], new_order)
    assert wq.scheme["mean_group_cycles"] == 1.5  # channel 0's group now uses one position (8), channel 1's two
