"""The rounding engine's feedback mode (GPTQ error feedback on each scheme's grid): it never does
worse than nearest rounding on the calibration H, it is vectorised over conv groups without changing
a decision, its AXE budget holds by construction, and every scheme's manifest still loads and verifies."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import ptq
from ptq.api import quantize_prepared
from ptq import bitserial
from ptq.bitserial import nearest_tables
from ptq.accbound import exceeds, sign_masses
from ptq.intmath import qmax
from ptq.ir.grids import Grid, SwisGrid
from ptq.methods.base import per_layer
from ptq.methods.errormodel import UNSEEN_WEIGHT, ErrorModel, clip_residuals, clip_search, quantize_symmetric
from ptq.methods.rounding import feedback_integers
from ptq.methods.swis import feedback_decompose, position_sets


def correlated_h(k: int, groups: int = 1, n: int = 3000, seed: int = 0) -> np.ndarray:
    """(G, K, K) second moments of correlated inputs, like neighbouring pixels of a feature map."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, groups, k))
    x = x + 0.8 * np.roll(x, 1, axis=-1) + 0.5 * x.mean(-1, keepdims=True)
    return np.einsum("ngi,ngj->gij", x, x) / n


def errors(h: np.ndarray, w: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    return ErrorModel(h, w.shape[0])((w - q * s[:, None]).astype(np.float32))


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_feedback_lowers_the_output_error_of_a_constructed_layer(bits):
    rng = np.random.default_rng(1)
    w, h = rng.normal(size=(48, 72)), correlated_h(72)
    s = clip_search(w, bits, ErrorModel(h, 48))
    near = quantize_symmetric(w, s, bits)
    fb = feedback_integers(w / s[:, None], h, Grid(bits))
    assert np.abs(fb).max() <= qmax(bits) and fb.dtype == np.int64
    e_near, e_fb = errors(h, w, near, s).sum(), errors(h, w, fb, s).sum()
    assert e_fb < 0.85 * e_near  # measured 0.80, 0.78, 0.73 at 3, 4, 8 bits


@pytest.mark.parametrize("groups", [1, 4])
def test_feedback_hands_over_the_updated_weights_its_integers_are_the_nearest_grid_values_of(groups):
    """The learned rounding's `start = "feedback"` takes each weight's pair around these values."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 24))
    h = correlated_h(24, groups)
    s = np.abs(w).max(1) / 7
    updated: list[np.ndarray] = []
    q = feedback_integers(w / s[:, None], h, Grid(4), block=8, updated=updated)
    assert np.array_equal(q, feedback_integers(w / s[:, None], h, Grid(4), block=8))  # the same integers
    (u,) = updated
    assert u.shape == w.shape and not np.allclose(u, w / s[:, None])
    cols = torch.arange(24).expand(16, 24)
    assert np.array_equal(q, Grid(4).project(torch.from_numpy(u), cols).numpy())

def test_natural_order_and_block_size_are_options_not_different_algorithms():
    """Lazy block updates are exact: block 1 and block 16 decide the same integers."""
    rng = np.random.default_rng(2)
    w, h = rng.normal(size=(16, 40)), correlated_h(40)
    s = np.abs(w).max(1) / 7
    for order in ("diag", "natural"):
        a = feedback_integers(w / s[:, None], h, Grid(4), order=order, block=1)
        b = feedback_integers(w / s[:, None], h, Grid(4), order=order, block=16)
        assert np.array_equal(a, b), order
    assert not np.array_equal(feedback_integers(w / s[:, None], h, Grid(4), order="natural"),
                              feedback_integers(w / s[:, None], h, Grid(4), order="diag"))


def test_grouped_conv_is_each_group_on_its_own():
    """A depthwise layer (one channel per group, K = 9) decided in one batched call gives exactly the
    integers of deciding each group with its own H."""
    rng = np.random.default_rng(3)
    g = 12
    w, h = rng.normal(size=(g, 9)), correlated_h(9, groups=g)
    s = np.abs(w).max(1) / 7
    batched = feedback_integers(w / s[:, None], h, Grid(4))
    single = np.concatenate([feedback_integers(w[i:i + 1] / s[i], h[i:i + 1], Grid(4)) for i in range(g)])
    assert np.array_equal(batched, single)


def test_a_dead_input_column_takes_no_feedback():
    """An input that is always zero has no output error: its weight is rounded to nearest, and nothing
    is pushed through it (H would be singular without the guard)."""
    rng = np.random.default_rng(4)
    h = correlated_h(10)
    h[:, 3, :] = 0
    h[:, :, 3] = 0
    w = rng.normal(size=(6, 10))
    s = np.abs(w).max(1) / 7
    q = feedback_integers(w / s[:, None], h, Grid(4))
    assert np.array_equal(q[:, 3], np.clip(np.floor(w[:, 3] / s + 0.5), -7, 7))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 8), k=st.integers(1, 40), c=st.integers(1, 6),
       share=st.floats(0.0, 1.5), per_sign=st.booleans())
def test_the_axe_budget_is_never_exceeded(seed, bits, k, c, share, per_sign):
    """Whatever the layer and however small the budget — on the total ℓ1 mass (two-sided inputs) or
    on each sign's (one-sided ones) — no channel spends more (the accumulator bound holds by
    construction, not by a later check)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(c, k)) * rng.uniform(0.1, 10, size=(c, 1))
    h = correlated_h(k, n=200, seed=seed)
    s = np.abs(w).max(1) / qmax(bits)
    pos, neg = sign_masses(quantize_symmetric(w, s, bits))
    inf = np.full(c, np.inf)
    budget = (np.stack([np.floor(share * pos), np.floor(share * neg), inf], 1) if per_sign
              else np.stack([inf, inf, np.floor(share * (pos + neg))], 1))
    q = feedback_integers(w / s[:, None], h, Grid(bits), budget=budget)
    assert not exceeds(q, budget).any() and np.abs(q).max(initial=0) <= qmax(bits)
    got = sign_masses(q)
    assert np.all(got[0] <= budget[:, 0]) and np.all(got[1] <= budget[:, 1]) and np.all(got[0] + got[1] <= budget[:, 2])


def test_swis_feedback_keeps_every_weight_on_its_groups_shift_set():
    rng = np.random.default_rng(5)
    c, k, group = 8, 32, 8
    w, h = rng.normal(size=(c, k)), correlated_h(k)
    shifts = rng.choice([0b1110000, 0b0111000, 0b1010100, 0b0001110], size=(c, k // group))
    s = np.abs(w).max(1) / 127
    grid = SwisGrid(8, shifts, group)
    q = feedback_integers(w / s[:, None], h, grid)
    assert not bitserial.unrepresentable(q, shifts, group).any()
    near = grid.project(torch.from_numpy(w / s[:, None]), torch.arange(k).expand(c, k)).numpy()
    assert errors(h, w, q, s).sum() < errors(h, w, near, s).sum()


def test_swis_feedback_keeps_the_weights_of_an_input_never_seen():
    """An input that is zero on every calibration sample is zero in H's row and column: its weights
    stay the nearest values of their sets (not zeros, which other data would feel) and take no error."""
    rng = np.random.default_rng(6)
    c, k, group = 4, 16, 8
    w, h = rng.normal(size=(c, k)), correlated_h(k)
    h[:, 3, :] = h[:, :, 3] = 0.0
    masks = position_sets(7, 3)
    s = np.abs(w).max(1) / 127
    q, shifts = feedback_decompose(w, s, h, nearest_tables(masks, 7), masks, 127, group)
    sets = SwisGrid(8, shifts, group)
    near = sets.project(torch.from_numpy(w / s[:, None]), torch.arange(k).expand(c, k)).numpy()
    assert np.array_equal(q[:, 3], near[:, 3]) and np.any(q[:, 3])


@pytest.fixture(scope="module")
def prepared(digits):
    model, xtr, _, xte, _ = digits
    from ptq.api import prepare
    return prepare(model, xtr[:128], "w4a8", eval_data=xte[:64], eval_size=64)


@pytest.mark.parametrize("recipe", ["w4a8", "multipoint-w3", "bitplane-3b", "swis-n2", "acc12"])
def test_every_scheme_takes_feedback_loads_and_verifies(prepared, recipe, tmp_path):
    """Feedback on each scheme lowers (never raises) every layer's output error on the calibration H,
    and the manifest verifies; the accumulator recipe keeps its data-free bound."""
    qm = quantize_prepared(prepared, recipe, overrides={"weights.rounding": "feedback"})
    rec = qm.manifest.data["method_info"]["rounding"]
    assert set(rec) == {op["name"] for op in qm.manifest.weighted_ops()}
    assert all(r["rounding"] == "feedback" and r["error"] <= r["error_nearest"] for r in rec.values())
    assert sum(r["error"] for r in rec.values()) < sum(r["error_nearest"] for r in rec.values())
    assert qm.report["verification"]["verified"], qm.report["verification"]["reason"]
    loaded = ptq.load(qm.save(tmp_path / recipe))
    assert loaded.manifest.data["method_info"]["rounding"] == json.loads(json.dumps(rec))
    assert "feedback on" in loaded.card()


def test_rounding_is_set_per_layer_by_overrides(prepared):
    from ptq.recipe import resolve
    r = resolve("w4a8", {"weights.rounding": "feedback"})  # a resolved recipe, given back
    r["overrides"] = r["overrides"] + [{"layers": ["first"], "weights.rounding": "nearest"}]
    qm = quantize_prepared(prepared, r)
    rec = qm.manifest.data["method_info"]["rounding"]
    first = qm.manifest.weighted_ops()[0]["name"]
    assert rec[first] == {"rounding": "nearest"} and all(v["rounding"] == "feedback" for k, v in rec.items() if k != first)


def test_an_unknown_rounding_is_a_one_line_recipe_error(prepared):
    with pytest.raises(ptq.errors.RecipeError, match="weights.rounding' must be one of nearest, feedback, learned"):
        quantize_prepared(prepared, "w4a8", overrides={"weights.rounding": "stochastic"})


def _term0(qm) -> dict[str, np.ndarray]:
    return {op["name"]: qm.manifest.tensor(op["weight"]["terms"][0]["q"]) for op in qm.manifest.weighted_ops()}


def test_the_float_target_on_a_small_cnn_verifies_and_needs_the_sequential_pass(prepared):
    over = {"weights.rounding": "feedback", "rounding.sequential": True, "rounding.samples": 32, "bias_correction.mode": "none"}
    own = quantize_prepared(prepared, "w4a8", overrides=over)
    aim = quantize_prepared(prepared, "w4a8", overrides={**over, "rounding.target": "float"})
    assert aim.report["verification"]["verified"]
    a, b = own.manifest.data["method_info"]["rounding"], aim.manifest.data["method_info"]["rounding"]
    assert any(a[n]["error_nearest"] != b[n]["error_nearest"] for n in a)  # the layers aim elsewhere
    ia, ib = _term0(own), _term0(aim)
    assert any(not np.array_equal(ia[n], ib[n]) for n in ia)
    with pytest.raises(ptq.errors.RecipeError, match="rounding.target = 'float' needs .* rounding.sequential = true"):
        quantize_prepared(prepared, "w4a8", overrides={"weights.rounding": "feedback", "rounding.target": "float"})


def test_the_one_shot_path_frees_the_moments_before_the_walk_and_changes_no_bit(digits, monkeypatch):
    """`keep_statistics=False` (what `ptq.quantize` runs) drops the layer input moments once the
    rounding engine has read them for the last time, so that the walk's feature maps do not stack on
    them; the integers and biases are the same bytes as with the moments kept."""
    import ptq.methods.rounding as rounding
    from ptq.api import prepare
    model, xtr, _, _, _ = digits
    over = {"weights.rounding": "feedback", "rounding.sequential": True, "rounding.samples": 32, "bias_correction.samples": 32}
    seen = []
    walk = rounding.walk

    def spy(graph, stats, *a, **k):
        seen.append(len(stats.layer_inputs))
        return walk(graph, stats, *a, **k)

    monkeypatch.setattr(rounding, "walk", spy)
    kept, freed = (prepare(model, xtr[:128], "w4a8", eval_size=0) for _ in range(2))
    a = quantize_prepared(kept, "w4a8", overrides=over)
    b = quantize_prepared(freed, "w4a8", overrides=over, keep_statistics=False)
    assert seen[0] == len(kept.stats.layer_inputs) > 0 and seen[1] == 0 and freed.stats.layer_inputs == {}
    assert a.manifest.tensors.keys() == b.manifest.tensors.keys()
    assert all(np.array_equal(a.manifest.tensor(r), b.manifest.tensor(r)) for r in a.manifest.tensors)


def _float_target_case(seed: int, n: int = 4000, k: int = 24, c: int = 16):
    """A layer whose quantized-model inputs x_q differ from the FP32 ones x_fp by a correlated,
    input-dependent error (as an upstream quantized layer leaves): rows are samples."""
    rng = np.random.default_rng(seed)
    xf = rng.normal(size=(n, k))
    xf = xf + 0.8 * np.roll(xf, 1, axis=-1)
    xq = xf + 0.15 * xf @ rng.normal(size=(k, k)) / np.sqrt(k) + 0.05 * rng.normal(size=(n, k))
    return rng.normal(size=(c, k)), xq, xf


def test_the_float_target_equals_the_weights_when_the_inputs_are_not_quantized():
    from ptq.methods.rounding import float_target
    w, xq, _ = _float_target_case(3)
    h = (xq.T @ xq)[None]
    assert np.array_equal(float_target(w, h, np.zeros_like(h), 0.01), w)


def test_feedback_on_the_float_target_lowers_the_error_against_fp32_outputs():
    """min ‖W·x_fp − Q·x_q‖ (GPTAQ): rounding W̃ = W + W·D·H⁻¹ on H beats rounding W itself, on
    the objective measured directly from the samples."""
    from ptq.methods.rounding import float_target
    for seed in range(3):
        w, xq, xf = _float_target_case(seed)
        h, d = (xq.T @ xq)[None], ((xf - xq).T @ xq)[None]
        s = np.abs(w).max(1) / 7
        aim = float_target(w, h, d, 0.01)
        own = feedback_integers(w / s[:, None], h, Grid(4)) * s[:, None]
        moved = feedback_integers(aim / s[:, None], h, Grid(4)) * s[:, None]
        ref = xf @ w.T
        e_own, e_moved = ((ref - xq @ own.T) ** 2).sum(), ((ref - xq @ moved.T) ** 2).sum()
        assert e_moved < 0.7 * e_own, (seed, e_moved / e_own)


def test_sequential_cross_moment_is_taken_on_the_same_patches():
    """D = E[(x_fp − x_q) x_qᵀ] pairs each quantized-stream patch with the FP32 patch at the same
    sampled position (a shifted copy of the map would make D differ from this direct sum)."""
    from ptq.calib.collect import layer_patches
    from ptq.ir import Op
    from ptq.methods.rounding import SEED, sequential_moments
    op = Op("c", "conv", ["x"], "y", weight=np.zeros((4, 3, 3, 3), np.float32),
            attrs={"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1})
    g = torch.Generator().manual_seed(5)
    xf = torch.randn(6, 3, 10, 10, generator=g)
    xq = xf + 0.1 * torch.randn(6, 3, 10, 10, generator=g)
    h, d, _ = sequential_moments(op, xq, xf, positions=7, size=4)
    gen = torch.Generator().manual_seed(SEED)
    hh = dd = 0
    for i in (0, 4):
        st_ = gen.get_state()
        pq = layer_patches(op, xq[i:i + 4], 7, gen)[0].double()
        pf = layer_patches(op, xf[i:i + 4], 7, torch.Generator().set_state(st_))[0].double()
        hh, dd = hh + pq.T @ pq / 42, dd + (pf - pq).T @ pq / 42
    assert np.allclose(h[0], hh.numpy(), rtol=1e-5, atol=1e-4) and np.allclose(d[0], dd.numpy(), rtol=1e-5, atol=1e-4)
    assert np.abs(d).max() > 0


@pytest.mark.parametrize("groups", [1, 3])
def test_sequential_moments_on_several_threads_are_the_bits_of_one(groups):
    """The walk's layer moments take their mini-batches on a thread pool, each from the positions'
    generator state the in-order pass reaches it with: H and D are the same bits as on one thread,
    and as drawing the positions in order (the last mini-batch short)."""
    from ptq.calib.collect import layer_patches, moments_of
    from ptq.ir import Op
    from ptq.methods.rounding import SEED, sequential_moments
    op = Op("c", "conv", ["x"], "y", weight=np.zeros((6, 6 // groups, 3, 3), np.float32),
            attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": groups})
    g = torch.Generator().manual_seed(9)
    xf = torch.randn(11, 6, 9, 9, generator=g)
    xq = xf + 0.1 * torch.randn(11, 6, 9, 9, generator=g)
    one = sequential_moments(op, xq, xf, positions=13, size=3, workers=1)
    two = sequential_moments(op, xq, xf, positions=13, size=3, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    gen = torch.Generator().manual_seed(SEED)
    total = None
    for i in range(0, 11, 3):
        m = moments_of(layer_patches(op, xq[i:i + 3], 13, gen))
        total = m if total is None else total.merge(m)
    assert np.array_equal(one[0], total.hessian)


def test_codes_convert_on_several_threads_to_the_same_bits():
    """The walk's codes: the same bits converted on 1 or 2 threads, from real mini-batches or from
    chunks a pool's workers encoded (`encode`), and read back in the calling thread alone."""
    from ptq.methods.walk import Codes, encode
    x = torch.randn(64, 8, 33, 33, generator=torch.Generator().manual_seed(2)) * 3
    for b in ((0.05, -128, 127), (0.01, -1000, 1000)):  # one byte per code, and float codes
        one, two = Codes(x.split(16), b, 1), Codes(x.split(16), b, 2)
        assert torch.equal(one.codes, two.codes) and torch.equal(one.real(), two.real())
        assert torch.equal(one.real(slice(3, 9)), two.real()[3:9])
        pooled = Codes((encode(p, b) for p in x.split(8)), b, 2, encoded=True)
        assert pooled.codes.dtype == (torch.uint8 if b[2] - b[1] <= 255 else torch.float32)
        assert torch.equal(pooled.codes, one.codes) and torch.equal(pooled.real(slice(5, 40), here=True), one.real()[5:40])


@pytest.mark.parametrize("recipe, module, function", [("w4a8", "rounding", "feedback_layer"),
                                                      ("acc12", "accumulator", "layer_candidates")])
def test_a_layer_with_a_large_h_is_worked_on_alone_and_to_the_same_integers(prepared, monkeypatch, recipe, module, function):
    """Layers whose H is over `ALONE_BYTES` never run their feedback or accumulator search at the
    same time (each holds several K×K float64 matrices); the integers are those of the unlimited run."""
    import importlib
    import threading
    import time
    from ptq.methods import base

    over = {"weights.rounding": "feedback"}
    free = quantize_prepared(prepared, recipe, overrides=over)
    running, most, lock = [0], [0], threading.Lock()
    mod = importlib.import_module(f"ptq.methods.{module}")
    real = getattr(mod, function)

    def counted(*a, **k):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)  # long enough for a second worker to enter if it could
        try:
            return real(*a, **k)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(mod, function, counted)
    monkeypatch.setattr(base, "ALONE_BYTES", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # two layers at once if allowed
    alone = quantize_prepared(prepared, recipe, overrides=over)
    assert most[0] == 1
    assert free.manifest.tensors.keys() == alone.manifest.tensors.keys()
    assert all(np.array_equal(v, alone.manifest.tensors[k]) for k, v in free.manifest.tensors.items())


def test_clip_residuals_are_the_bits_of_the_integer_round_trip():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 40)) * 0.1
    w[0, :8] = np.arange(8) * 0.05 + 0.025  # half-way points of the step 0.05
    scales = np.abs(w).max(1)[None] * np.linspace(0.25, 1.0, 7)[:, None] / 7
    scales[0, 0] = 0.05
    want = (w[None] - quantize_symmetric(w, scales, 4) * scales[..., None]).astype(np.float32)
    assert np.array_equal(clip_residuals(w, scales, 4), want)


def test_a_group_unseen_on_calibration_data_is_measured_by_weight_error_and_the_others_as_before():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 64, 9)).astype(np.float32)  # 4 groups (a depthwise conv), 64 patches of 9
    x[2] = 0.0  # group 2's input is zero on every sample
    h = np.einsum("gnk,gnl->gkl", x, x) / 64
    w = rng.standard_normal((4, 9))
    unseen = ErrorModel(h, 4)
    diff = rng.standard_normal((3, 4, 9)).astype(np.float32)
    seen = [0, 1, 3]
    alone = ErrorModel(h[seen], 3)
    assert np.array_equal(unseen(diff)[:, seen], alone(diff[:, seen]))  # the seen groups' bits
    level = UNSEEN_WEIGHT * np.einsum("gkk->g", h[seen], dtype=np.float64).mean() / 9
    assert unseen(diff)[:, 2] == pytest.approx(level * (diff[:, 2].astype(np.float64) ** 2).sum(-1), rel=1e-5)
    plain = clip_search(w, 4, ErrorModel(None, 4))  # weight error alone
    assert clip_search(w, 4, unseen)[2] == plain[2]
    assert h[2].sum() == 0  # the statistics are not touched
    nothing = ErrorModel(np.zeros((1, 9, 9), np.float32), 4, np.zeros((1, 2, 9), np.float32))  # a classifier fed zeros
    assert np.array_equal(clip_search(w, 4, nothing), plain)


class _Layer:
    def __init__(self, name, size):
        self.name, self.weight = name, np.zeros(size)


def test_per_layer_returns_op_order_and_starts_the_largest():
    ops = [_Layer("a", 3), _Layer("b", 50), _Layer("c", 7), _Layer("d", 50)]
    started = []

    def work(op):
        started.append(op.name)
        return op.name.upper()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one loop: the start order is observable
    try:
        assert per_layer(work, ops) == ["A", "B", "C", "D"]
    finally:
        torch.set_num_threads(threads)
    assert started == ["b", "d", "c", "a"]


def test_per_layer_advances_its_progress_bar_as_each_layer_finishes(monkeypatch):
    """A method's per-layer search is most of a long quantize: its bar must move layer by layer,
    not jump to the end once every layer is done."""
    import contextlib

    import ptq.methods.base as base
    seen = []

    @contextlib.contextmanager
    def bar(description, total):
        seen.append(("open", description, total))
        yield lambda n=1: seen.append(("advance", n))
        seen.append(("close",))

    monkeypatch.setattr(base, "progress", bar)
    ops = [_Layer("a", 3), _Layer("b", 50), _Layer("c", 7)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_layer(lambda op: seen.append(("work", op.name)), ops, description="clip search (layers)")
    finally:
        torch.set_num_threads(threads)
    assert seen == [("open", "clip search (layers)", 3), ("work", "b"), ("advance", 1), ("work", "c"), ("advance", 1),
                    ("work", "a"), ("advance", 1), ("close",)]
