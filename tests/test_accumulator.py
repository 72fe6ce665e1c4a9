"""Accumulator bounds, L1 fitting, and 16/12-bit accumulators that never overflow by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ptq
from ptq.accbound import (datatype_bound, fit_budget, fit_l1, limit, mass_budgets, project_l1, scaling_orders, sign_masses,
                          worst_accumulator)
from ptq.runtime.simulator import Simulator


def test_projection_is_the_euclidean_projection_onto_the_l1_ball():
    import cvxpy as cp
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 20)) * 4
    r = np.array([0.0, 3.0, 10.0, 25.0, 60.0, 500.0])
    p = project_l1(v, r)
    for i in range(len(v)):
        x = cp.Variable(20)
        cp.Problem(cp.Minimize(cp.sum_squares(x - v[i])), [cp.norm1(x) <= r[i]]).solve()
        np.testing.assert_allclose(p[i], x.value, atol=1e-5)
    np.testing.assert_array_equal(p[-1], v[-1])  # inside the ball: unchanged


def test_fit_l1_meets_the_bound_exactly_and_rounds_to_nearest_when_it_can():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(200, 64)) * 3
    r = np.floor(rng.uniform(0, 150, size=200))
    q = fit_l1(v, r, qmax=7)
    assert np.all(np.abs(q).sum(1) <= r) and np.abs(q).max() <= 7
    loose = fit_l1(v, np.full(200, 1e9), qmax=7)
    np.testing.assert_array_equal(loose, np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -7, 7))


def test_bounds_in_closed_form():
    q = np.array([[3, -4, 0], [127, 127, -127]])
    b = np.array([10, -5])
    np.testing.assert_array_equal(worst_accumulator(q, -127, 127, b), [7 * 127 + 10, 381 * 127 + 5])  # A2Q's
    # after a ReLU each sign's mass counts alone, the bias where it pushes: max(3·255 + 10, 4·255), max(254·255, 127·255 + 5)
    np.testing.assert_array_equal(worst_accumulator(q, 0, 255, b), [4 * 255, 254 * 255])
    np.testing.assert_array_equal(worst_accumulator(q, -255, 0, b), [4 * 255 + 10, 254 * 255 + 5])  # inputs ≤ 0: mirrored
    assert datatype_bound(3, 255, 8) == 3 * 255 * 127
    np.testing.assert_array_equal(mass_budgets(16, -128, 127, np.array([0, -32767, 40000]))[:, 2], [255, 0, 0])
    np.testing.assert_array_equal(mass_budgets(16, 0, 255, np.array([0, 32767, -2000])),
                                  [[128, 128, np.inf], [0, 128, np.inf], [128, 120, np.inf]])
    assert limit(16) == 32767


def test_projection_threshold_holds_when_the_support_reaches_past_the_first_sorted_magnitudes():
    """Rows of 1,500 weights whose projected support is 0, a few, a few hundred or over a thousand
    entries: each projection spends exactly its radius and keeps the signs."""
    rng = np.random.default_rng(2)
    v = rng.normal(size=(5, 1500)) * 3
    r = np.array([0.0, 4.0, 900.0, 2500.0, 1e6])
    p = project_l1(v, r)
    np.testing.assert_allclose(np.abs(p[:4]).sum(1), r[:4], rtol=1e-12)
    assert np.all(p * v >= 0)
    assert (p[3] != 0).sum() > 1024 and 256 < (p[2] != 0).sum() < 1500
    np.testing.assert_array_equal(p[4], v[4])


@pytest.mark.parametrize("sorted_once", [False, True])
def test_fit_l1_rounds_down_the_smallest_fractions_first_and_the_lower_column_among_equal_ones(sorted_once):
    """Row 3 projects to (1.5, 3.5, 2, 0): one of its two halves goes down, the lower column's,
    though a projected row is rounded in its magnitude order (column 1 first)."""
    v = np.array([[1.5, 1.5, 1.5, 1.5], [2.6, -1.9, 0.7, 0.5], [2.5, 4.5, 3.0, 0.2]])
    order = (lambda i, j: np.argsort(-np.abs(v[i:j]), axis=1, kind="stable")) if sorted_once else None
    q = fit_l1(v, np.array([6.0, 5.0, 7.0]), qmax=7, order=order)
    # row 2: projected to (2.425, -1.725, .525, .325)
    np.testing.assert_array_equal(q, [[1, 1, 2, 2], [2, -2, 1, 0], [1, 4, 2, 0]])


@pytest.mark.parametrize("span", [(0, 255), (-255, 0), (-128, 127), (0, 15), (-3, 12)])
def test_fitted_integers_meet_the_exact_bound_and_one_sided_inputs_leave_more_weight(span):
    """Random layers and biases at P = 12 and 16: every fitted channel's worst partial sum, each
    product at its extreme input, fits; after a ReLU a channel keeps more of its weight than A2Q's
    ℓ1 ball would leave it."""
    rng = np.random.default_rng(4)
    lo, hi = span
    for p in (12, 16):
        v = rng.normal(size=(64, 300)) * rng.uniform(0.5, 20, size=(64, 1))
        b = np.round(rng.normal(size=64) * limit(p) * 0.2)
        q = fit_budget(v, mass_budgets(p, lo, hi, b), qmax=127)
        top = np.maximum(q * lo, q * hi).sum(1) + np.maximum(b, 0)
        bottom = -np.minimum(q * lo, q * hi).sum(1) + np.maximum(-b, 0)
        assert max(top.max(), bottom.max()) <= limit(p)
        assert np.array_equal(worst_accumulator(q, lo, hi, b), np.maximum(top, bottom))
        a2q = fit_l1(v, np.floor(np.maximum(limit(p) - np.abs(b), 0) / max(hi, -lo)), qmax=127)
        if lo == 0 or hi == 0:
            assert np.abs(q).sum() > 1.5 * np.abs(a2q).sum()
        else:
            assert np.array_equal(q, a2q)


@pytest.mark.parametrize("kind", ["sparse", "dense", "grouped", "factor", "unknown"])
def test_expanded_error_and_refitted_step_equal_the_direct_ones(kind):
    """The accumulator's candidates are scored by wᵀHw − 2s·qᵀHw + s²·qᵀHq with H's block gathered
    over their nonzeros; that must be the error of s·q itself, on every form of H."""
    from ptq.methods.errormodel import ErrorModel, Expansion
    rng = np.random.default_rng(3)
    g, k, c = {"sparse": (1, 1500, 6), "dense": (1, 300, 6), "grouped": (3, 9, 6), "factor": (1, 40, 4),
               "unknown": (1, 30, 4)}[kind]
    x = np.maximum(rng.normal(size=(g, 400, k)), 0)
    h = np.einsum("gnk,gnj->gkj", x, x) / 400
    f = x[:, :24] / np.sqrt(24) if kind == "factor" else None
    if f is not None:
        h = np.einsum("grk,grj->gkj", f, f)
    err = ErrorModel(None if kind == "unknown" else h, c, f)
    w = rng.normal(size=(c, k)) * 0.1
    s = np.abs(w).max(1)[None] / 7 * np.array([1.0, 1.5, 2.5])[:, None]
    q = fit_l1((w[None] / s[..., None]).reshape(-1, k), np.full(3 * c, 12.0), 7).reshape(3, c, k)
    step, e = Expansion(err, w).refit(q, s)
    np.testing.assert_allclose(step, np.maximum(s, err.refit_scale(w, q, s)), rtol=2e-6)
    np.testing.assert_allclose(e, err((w[None] - q * step[..., None]).astype(np.float32)), rtol=2e-5)
    assert np.all(step >= s)


class Wide(nn.Module):
    """A layer a naive 8×8-bit quantization cannot fit in 16 bits: K = 256 large positive weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 256)
        self.fc2 = nn.Linear(256, 10)
        with torch.no_grad():
            self.fc2.weight.copy_(torch.rand(10, 256) * 0.5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def wide_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(256, 32)).astype(np.float32), rng.normal(size=(256, 32)).astype(np.float32)


def test_naive_8x8_layer_overflows_a_16_bit_accumulator_and_the_allocator_fixes_it(wide_data):
    calib, held = wide_data
    model = Wide().eval()
    naive = ptq.quantize(model, calib, "w8a8", eval_data=held, overrides={"accumulator.bits": 16, "accumulator.mode": "wrap"})
    assert not naive.manifest.data["verification"]["structural"]["ok"]
    sim = Simulator(naive.manifest)
    wrapped = sim(torch.from_numpy(held))
    assert sim.layers["fc2"].overflows > 0 and sim.layers["fc2"].max_abs > limit(16)
    # the integer ONNX twin wraps the same accumulators: onnxruntime gives the simulator's outputs exactly
    from ptq.export import onnxruntime_runner
    assert np.array_equal(onnxruntime_runner(naive.manifest, fmt="int")(held), wrapped)
    assert not np.array_equal(Simulator(naive.manifest, "exact")(torch.from_numpy(held)), wrapped)

    fitted = ptq.quantize(model, calib, "acc16", eval_data=held)
    m = fitted.manifest
    assert m.data["verification"]["structural"]["ok"] and m.data["verification"]["numeric"]["ok"]
    assert m.data["method_info"]["allocator"]["status"] == "optimal"
    for mode in ("wrap", "saturate"):
        s = Simulator(m, mode, 16)
        for x in (calib, held):
            s(torch.from_numpy(x))
        assert sum(st.overflows for st in s.layers.values()) == 0
    assert fitted.report["fidelity"]["top1_agreement"] >= 80.0  # measured 89.1 (a random network: near-ties)


def test_saturate_mode_runs_convolutions_and_matches_exact_without_overflow(digits):
    """Sequential saturating MACs through convs (stride, padding, depthwise groups) and the linear head:
    with a bound every channel meets, saturation never triggers and the outputs equal exact mode."""
    model, xtr, _, xte, _ = digits
    qm = ptq.quantize(model, xtr[:128], "acc16", eval_data=np.asarray(xte[:32]))
    x = torch.from_numpy(np.asarray(xte[:24]))
    exact = Simulator(qm.manifest, "exact", 16)(x)
    s = Simulator(qm.manifest, "saturate", 16)
    assert np.array_equal(s(x), exact)
    assert all(st.overflows == 0 for st in s.layers.values())
    tight = Simulator(qm.manifest, "saturate", 9)  # far too narrow: the simulator counts what saturation changed
    tight(x)
    assert sum(st.overflows for st in tight.layers.values()) > 0
    # within the bound the simulator skips the MAC loop; the loop itself still equals the exact sum there
    from ptq.runtime.simulator import _saturating_conv, integer_gemm
    m = qm.manifest
    g = m.to_graph()
    codes = Simulator(m).run(x, keep=[op.inputs[0] for op in g.ops if op.kind == "conv"])
    for op in [o for o in g.ops if o.kind == "conv"][:2]:
        u = codes[op.inputs[0]] - m.encoding(op.inputs[0])["zero_point"]
        q = torch.from_numpy(m.tensor(op.record["weight"]["terms"][0]["q"]).astype(np.int64))
        b = torch.from_numpy(m.tensor(op.record["bias"]["q"]).astype(np.int64))
        want = integer_gemm(op, u, q.float()).long() + b.reshape(1, -1, 1, 1)
        assert torch.equal(_saturating_conv(u, q, b, op, 16), want)


@pytest.mark.parametrize("recipe,p", [("acc16", 16), ("acc12", 12)])
def test_digits_data_free_bound_holds_for_every_channel(digits, recipe, p):
    model, xtr, ytr, xte, yte = digits
    qm = ptq.quantize(model, xtr[:256], recipe, eval_data=np.asarray(xte[:128]))
    m = qm.manifest
    for rec in m.weighted_ops():
        e = m.encoding(rec["inputs"][0])
        lo, hi = -e["zero_point"], (1 << e["bits"]) - 1 - e["zero_point"]
        q = m.tensor(rec["weight"]["terms"][0]["q"]).astype(np.int64)
        q = q.reshape(q.shape[0], -1)
        b = m.tensor(rec["bias"]["q"]).astype(np.int64)
        # every partial sum, each product at its extreme input, the bias where it pushes the same way
        top = np.maximum(q * lo, q * hi).sum(1) + np.maximum(b, 0)
        bottom = -np.minimum(q * lo, q * hi).sum(1) + np.maximum(-b, 0)
        assert max(top.max(), bottom.max()) <= limit(p), rec["name"]
        assert rec["accumulator"]["bits"] == p and rec["accumulator"]["bound"] in ("weight-level", "data-type")
    sim = Simulator(m, "wrap", p)
    out = sim(torch.from_numpy(np.asarray(xte)))
    assert sum(st.overflows for st in sim.layers.values()) == 0
    acc = float((out.argmax(1) == np.asarray(yte)).mean())
    with torch.no_grad():
        fp = float((model(torch.from_numpy(np.asarray(xte))).argmax(1).numpy() == np.asarray(yte)).mean())
    assert acc >= fp - (0.02 if p == 16 else 0.05)


def test_naive_mode_picks_one_width_pair_for_every_layer(digits):
    model, xtr, *_ = digits
    qm = ptq.quantize(model, xtr[:256], "acc12", overrides={"allocator.mode": "naive"}, eval_data=np.asarray(xtr[:64]))
    info = qm.manifest.data["method_info"]
    assert info["allocator"] == "naive"
    for rec in qm.manifest.weighted_ops():
        assert rec["weight"]["bits"] == info["weight_bits"]
        assert qm.manifest.encoding(rec["inputs"][0])["bits"] == info["input_bits"]
        assert rec["accumulator"]["data_free_bits"] <= 12


def test_infeasible_size_budget_says_the_least_that_works(digits, tmp_path, capsys):
    from ptq.cli import main
    model, xtr, *_ = digits
    with pytest.raises(ptq.errors.BudgetError, match=r"allocator.mean_weight_bits = 1.5 cannot be met with 16-bit accumulators .*the least is 2.000"):
        ptq.quantize(model, xtr[:64], "acc16", overrides={"allocator.mean_weight_bits": 1.5}, eval_data=np.asarray(xtr[:16]))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32))
    code = main(["quantize", "benchmarks.reliability:tiny", "--recipe", "acc16", "--calib", str(tmp_path / "x.npy"),
                 "--input-shape", "1,8,8", "--set", "allocator.mean_weight_bits=1.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "the least is 2.000" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_the_chosen_candidate_rebuilt_from_its_payload_is_the_one_the_search_measured(digits):
    """The allocator's candidates keep (M, N, clipped steps), not integers; `LayerFit.weights` rebuilds
    a candidate. Every candidate of every layer, rebuilt, needs the accumulator width and has the
    output error the search recorded, within the bound it was fitted to."""
    from ptq.api import prepare
    from ptq.accbound import bits_for
    from ptq.intmath import round_half_up
    from ptq.methods.accumulator import LayerFit, layer_candidates
    from ptq.methods.base import error_weights
    model, xtr, *_ = digits
    prep = prepare(model, xtr[:128], "acc12", eval_size=0)
    g, r = prep.graph, prep.recipe
    src, producers = g.encoding_source(), g.producers()
    projected = 0
    for op in g.weighted_ops():
        t = src[op.inputs[0]]
        act = producers[t].attrs.get("act") if t in producers else None
        cands = layer_candidates(LayerFit(op, prep.stats, r, t, act, 12), prep.stats, r, [3, 5, 8], [4, 8])
        for c in cands:
            fit = LayerFit(op, prep.stats, r, t, act, 12)
            wq = fit.weights(*c.payload)
            (q, s), = wq.terms
            q = q.reshape(q.shape[0], -1)
            assert q.dtype == np.int64 and np.abs(q).max() <= (1 << (c.knobs["weight_bits"] - 1)) - 1
            e = fit.encoding(c.knobs["input_bits"])
            lo, hi = -e.zero_point, (1 << e.bits) - 1 - e.zero_point
            bq = round_half_up(fit.bias / (e.scale * s))
            assert int(bits_for(worst_accumulator(q, lo, hi, bq).max())) == c.acc_bits <= 12
            what = q * s[:, None]
            e_w = fit.err((fit.w - what).astype(np.float32))
            error = float(np.sum(error_weights(op, prep.stats, fit.err, fit.w) * (e_w + e.scale ** 2 / 12.0 * (what ** 2).sum(1))))
            assert np.isclose(error, c.error, rtol=1e-3 if c.knobs["projected"] else 1e-9, atol=0), (op.name, c.knobs)
            projected += c.knobs["projected"]
    assert projected > 0  # the rebuilt fits include projected ones


@pytest.mark.parametrize("batch_rows", [None, 3])
def test_fit_budget_with_the_weights_sorted_once_gives_the_same_integers(monkeypatch, batch_rows):
    """The accumulator fits 7 scalings of each channel's weights per width pair from one sort per
    layer (`accbound.scaling_orders`); that must change no integer against sorting every row, including
    ties, zeros, clipping at qmax and supports wider than the first TOP_FIRST magnitudes, and when
    the rows are fitted in batches that straddle the positive and negative parts."""
    import ptq.accbound as ab
    if batch_rows is not None:
        monkeypatch.setattr(ab, "FIT_ELEMENTS", batch_rows * 700)
    rng = np.random.default_rng(5)
    c, k = 12, 700
    w = rng.normal(size=(c, k)) * rng.uniform(0.01, 1, size=(c, 1))
    w[0, 1:] = 0.0  # one weight: a near-dead channel
    w[1, ::2] = w[1, 1::2]  # equal magnitudes
    w[2] = np.round(w[2] * 4) / 4  # many ties
    s = np.abs(w).max(1, keepdims=True).T / 127 * np.array([1.0, 1.5, 4.0, 0.05])[:, None]  # (S, C)
    v = (w[None] / s[..., None]).reshape(-1, k)
    order = scaling_orders(w)
    for lo, hi in ((0, 255), (-128, 127)):
        budget = mass_budgets(12, lo, hi, rng.integers(-300, 300, size=len(v)))
        budget[::5] = mass_budgets(16, lo, hi, np.zeros(len(v)))[::5]  # some rows fit, some need all K
        np.testing.assert_array_equal(fit_budget(v, budget, 127, order), fit_budget(v, budget, 127))
