"""SWIS (ptq/methods/swis.py) and the bit-serial cycle model (ptq/bitserial.py)."""
import itertools

import numpy as np
import pytest
import torch

import ptq
from ptq import bitserial
from ptq.errors import BudgetError, ManifestError, RecipeError
from ptq.methods import swis as sw


def _brute_force(x: np.ndarray, h: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Least weighted error of every group over all position sets and all value assignments."""
    mb = bits - 1
    out = np.full(len(x), np.inf)
    for s in itertools.combinations(range(mb), n):
        values = [sum(b << k for b, k in zip(bs, s)) for bs in itertools.product((0, 1), repeat=n)]
        for i, (xg, hg) in enumerate(zip(x, h)):
            for assign in itertools.product(values, repeat=len(xg)):
                out[i] = min(out[i], float(np.sum(hg * (xg - np.array(assign)) ** 2)))
    return out


@pytest.mark.parametrize("bits,n,g", [(5, 2, 3), (6, 3, 2), (5, 1, 4)])
def test_set_search_equals_brute_force(bits, n, g):
    rng = np.random.default_rng(bits * 10 + n)
    m = (1 << (bits - 1)) - 1
    x = rng.uniform(0, m, (25, g))
    x[0] = [m] * g  # the clipping edge
    x[1] = np.round(x[1])  # exact integers and half-way ties
    x[2, 0] = 2.5
    h = rng.uniform(0.1, 2.0, (25, g))
    masks = sw.position_sets(bits - 1, n)
    assert len(masks) == len(list(itertools.combinations(range(bits - 1), n)))
    idx, mags = sw.best_sets(x, h, sw.nearest_tables(masks, bits - 1))
    got = np.sum(h * (x - mags) ** 2, axis=1)
    assert got == pytest.approx(_brute_force(x, h, bits, n), rel=1e-5, abs=1e-6)
    assert not np.any(mags & ~masks[idx][:, None])  # each value is made of its group's chosen positions


def test_set_search_takes_the_first_of_sets_that_represent_a_group_alike():
    # magnitudes below 1.5 map to 0 or 1 under every 2-position set containing bit 0: those sets
    # err exactly alike, and the search must return the first of them for every group
    masks = sw.position_sets(7, 2)
    tables = sw.nearest_tables(masks, 7)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.45, (5000, 8))
    idx, mags = sw.best_sets(x, rng.uniform(0.1, 3.0, x.shape), tables)
    first = next(i for i, mk in enumerate(masks) if mk & 1)
    assert np.all(idx == first)
    assert np.array_equal(mags, np.floor(x + 0.5).astype(np.int64))


def test_nearest_table_is_the_nearest_representable_value():
    masks = sw.position_sets(7, 3)
    tables = sw.nearest_tables(masks, 7)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 127, 2000)
    for mask, table in zip(masks[::5], tables[::5]):
        rep = np.array([v for v in range(128) if v & ~mask == 0])
        want = rep[np.abs(x[:, None] - rep[None]).argmin(1)]
        assert np.array_equal(table[np.floor(2 * x).astype(int)], want)


def test_swis_error_never_above_truncation():
    """Truncation (the N most significant positions) is one of the searched sets: per group, SWIS ≤ it."""
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, (48, 72)) * 0.05  # heavy-tailed, like real conv weights
    x = np.abs(np.clip(w / (np.abs(w).max(1, keepdims=True) / 127), -127, 127)).reshape(-1, 8)
    h = np.ones_like(x)
    _, s = sw.best_sets(x, h, sw.nearest_tables(sw.position_sets(7, 3), 7))
    _, t = sw.best_sets(x, h, sw.nearest_tables(sw.position_sets(7, 3, truncate=True), 7))
    es, et = ((x - s) ** 2).sum(1), ((x - t) ** 2).sum(1)
    assert np.all(es <= et + 1e-9)
    assert es.sum() < 0.6 * et.sum()  # and by a wide margin on heavy-tailed weights (measured 0.50)


def test_cycles_of_a_hand_computed_schedule():
    # 2 channels × K = 10, G = 4: groups are weights [0:4], [4:8], [8:10] + 2 zeros of padding
    q = np.array([[5, 0, -1, 0, 0, 0, 0, 0, 64, 2],
                  [3, 3, 3, 3, -8, 8, 8, 0, 0, 0]])
    # used positions: ch0: {0,2}, {}, {6,1}; ch1: {0,1}, {3}, {}  → cycles 2,0,2 / 2,1,0
    assert np.array_equal(bitserial.group_cycles(q, 4), [[2, 0, 2], [2, 1, 0]])
    s, order = bitserial.layer_schedule(q, 4, lanes=2, shared_bits=3, bits=8, out_positions=5)
    assert list(order) == [0, 2, 3, 4, 1, 5]  # longest first, stable
    # sorted: steps (2,2) (2,1) (0,0) → 2 + 2 + 0 = 4 per position; natural order (2,0) (2,2) (1,0) → 5
    assert s["cycles"] == 4 * 5 and s["cycles_unsorted"] == 5 * 5
    # 6 groups on 2 lanes = 3 steps: baseline 3·8, dense N = 3 → 3·3, per position
    assert s["baseline_cycles"] == 24 * 5 and s["dense_cycles"] == 9 * 5
    assert s["mean_group_cycles"] == pytest.approx(7 / 6)
    t = bitserial.totals({"a": s, "b": s})
    assert t["cycles"] == 40 and t["cycles_vs_baseline"] == pytest.approx(40 / 240)
    assert bitserial.storage_bits(8, 3, 8) == pytest.approx(1 + 3 + 9 / 8)
    assert bitserial.storage_bits(8, 7, 8) == 8.0
    assert bitserial.popcount(np.array([0, 1, 127, 255, 2**20 + 3])).tolist() == [0, 1, 7, 8, 3]


@pytest.fixture(scope="module")
def digits_prepared(digits):
    """The digits model captured and calibrated once; every SWIS variant below reuses the statistics."""
    from ptq.api import prepare
    model, xtr, _, xte, _ = digits
    return prepare(model, xtr[:256], "swis", eval_data=xte[:128], eval_size=128)


@pytest.fixture(scope="module")
def digits_swis(digits_prepared):
    from ptq.api import quantize_prepared
    return quantize_prepared(digits_prepared)


def test_swis_digits_keeps_agreement_and_every_weight_is_representable(digits, digits_swis):
    qm = digits_swis
    v = qm.manifest.data["verification"]
    assert v["structural"]["ok"] and v["numeric"]["ok"]
    f = qm.report["fidelity"]
    assert f["top1_agreement"] >= 97.0 and f["kl"] <= 0.02  # measured: see the brief / BENCHMARKS.md
    m = qm.manifest
    ops = m.weighted_ops()
    assert all(op["weight"]["scheme"] == "swis" for op in ops)
    for op in ops:
        w = op["weight"]
        q = m.tensor(w["terms"][0]["q"])
        shifts = m.tensor(w["extra"]["shifts"])
        assert q.dtype == np.int8 and shifts.shape == (q.shape[0], -(-q[0].size // w["group"]))
        assert not bitserial.unrepresentable(q, shifts, w["group"]).any()
        assert bitserial.popcount(shifts).max() <= w["shared_bits"]
        assert w["cycles"] <= w["cycles_unsorted"] <= w["dense_cycles"] <= w["baseline_cycles"]
    info = m.data["method_info"]["swis"]
    assert info["cycles"] == sum(op["weight"]["cycles"] for op in ops)
    # the shipped recipe: N per layer, no more cycles or storage than N = 3 everywhere
    assert info["mode"] == "allocate" and info["cycles"] <= 3 / 8 * info["baseline_cycles"]
    assert qm.report["mean_weight_bits"] <= bitserial.storage_bits(8, 3, 8) + 1e-9
    card = qm.card()
    assert f"{info['cycles']:,} cycles per sample" in card and "of the 8-cycle bit-serial baseline" in card
    assert card.count("\n| ") >= len(ops)  # one schedule row per layer
    assert f"| {ops[1]['name']} | {ops[1]['weight']['shared_bits']} | {ops[1]['weight']['cycles']:,} |" in card


def test_corrupted_swis_manifest_is_refused(digits_swis, tmp_path):
    qm = digits_swis
    d = qm.save(tmp_path / "swis")
    ptq.load(d)  # saved as is: valid
    m = qm.manifest
    op = next(op for op in m.weighted_ops() if op["weight"]["shared_bits"] < 7)
    w = op["weight"]
    q = m.tensor(w["terms"][0]["q"])
    flat = q.reshape(q.shape[0], -1)
    mask = int(m.tensor(w["extra"]["shifts"])[0, 0])
    outside = next(1 << j for j in range(7) if not mask >> j & 1)
    old = flat[0, 0].copy()
    flat[0, 0] = outside  # a power of two whose position is not in group (0, 0)'s set
    try:
        from ptq.runtime.verify import structural
        s = structural(m)  # level 1 on the in-memory manifest, before any save
        assert not s["ok"] and "not representable" in s["problem"]
        with pytest.raises(ManifestError, match=r"terms\[0\]\.q.*not representable.*extra\.shifts\[0, 0\]"):
            ptq.load(qm.save(tmp_path / "bad"))
    finally:
        flat[0, 0] = old
    shifts = m.tensor(w["extra"]["shifts"])
    shifts[0, 0] = 127  # every position: more than N
    try:
        with pytest.raises(ManifestError, match=r"extra\.shifts.*more than shared_bits"):
            ptq.load(qm.save(tmp_path / "bad2"))
    finally:
        shifts[0, 0] = mask
    w["cycles"] += 1
    try:
        with pytest.raises(ManifestError, match=r"weight\.cycles"):
            ptq.load(qm.save(tmp_path / "bad3"))
    finally:
        w["cycles"] -= 1


def test_simulator_counts_cycles_and_onnx_carries_the_scheme(digits, digits_swis):
    from ptq.export import onnxruntime_runner, read_ptq_metadata, export_qdq
    from ptq.runtime.simulator import Simulator
    x = digits[3][:64]
    sim = Simulator(digits_swis.manifest)
    sim(torch.from_numpy(x))
    for op in digits_swis.manifest.weighted_ops():
        st = sim.layers[op["name"]].to_dict()
        assert st["bitserial_cycles"] == 64 * op["weight"]["cycles"]
        assert st["bitserial_baseline_cycles"] == 64 * op["weight"]["baseline_cycles"]
    out = onnxruntime_runner(digits_swis.manifest)(x)
    assert float((out.argmax(1) == digits_swis.simulate(x).argmax(1)).mean()) >= 0.99
    layers = read_ptq_metadata(export_qdq(digits_swis.manifest))["layers"]
    rec = digits_swis.manifest.weighted_ops()[1]
    got = layers[rec["name"]]
    assert got["scheme"] == "swis" and got["shared_bits"] == rec["weight"]["shared_bits"]
    assert got["cycles"] == rec["weight"]["cycles"] and got["shifts_ref"] == rec["weight"]["extra"]["shifts"]


def test_swis_layers_beat_truncation_with_the_same_scale_search(digits_prepared):
    """Per layer of the digits model, output error (w − ŵ)ᵀH(w − ŵ) relative to the layer's output energy."""
    g, stats = digits_prepared.graph, digits_prepared.stats
    ratios = []
    for op in g.weighted_ops():
        s, t = (sw.swis_layer(op, stats, 8, 8, 3, 16, trunc, 6, "output") for trunc in (False, True))
        assert s.errors.sum() <= 1.05 * t.errors.sum()
        ratios.append(s.errors.sum() / t.errors.sum())
    assert np.mean(ratios) < 0.85  # measured 0.6-0.8 per layer


def test_allocate_mode_meets_the_cycle_budget(digits_prepared):
    from ptq.api import quantize_prepared
    qm = quantize_prepared(digits_prepared, overrides={"swis.mode": "allocate", "swis.cycles": 0.3, "overrides": [],
                                                       "swis.scale_grid": 2})
    info = qm.manifest.data["method_info"]
    assert info["swis"]["cycles"] <= 0.3 * info["swis"]["baseline_cycles"]
    assert info["allocator"]["status"] in ("optimal", "greedy", "optimal_inaccurate")
    assert len(set(info["swis"]["shared_bits"].values())) > 1
    assert qm.manifest.data["verification"]["numeric"]["ok"]


def test_bad_settings_are_one_line_recipe_errors(digits_prepared):
    from ptq.methods import METHODS
    from ptq.recipe import resolve
    g, stats = digits_prepared.graph, digits_prepared.stats
    with pytest.raises(RecipeError, match=r"swis.shared_bits = 8 .* must be below swis.bits = 8"):
        METHODS["swis"].quantize(g, stats, resolve("swis", {"swis.shared_bits": 8, "swis.mode": "fixed"}))
    with pytest.raises(RecipeError, match=r"swis.shared_bits = 8 must be below swis.bits = 8 \(it sets the default budgets\)"):
        METHODS["swis"].quantize(g, stats, resolve("swis", {"swis.shared_bits": 8}))
    with pytest.raises(RecipeError, match=r"swis.min_shared_bits = 5 exceeds swis.max_shared_bits = 4"):
        METHODS["swis"].quantize(g, stats, resolve("swis", {"swis.mode": "allocate", "swis.cycles": 0.5, "overrides": [],
                                                   "swis.min_shared_bits": 5, "swis.max_shared_bits": 4}))
    with pytest.raises(BudgetError, match=r"swis.cycles = 0.01 cannot be met"):
        METHODS["swis"].quantize(g, stats, resolve("swis", {"swis.cycles": 0.01, "swis.scale_grid": 0}))
    pinned = [{"layers": ["*"], "swis": {"min_shared_bits": 7}}]  # every layer at 8 bits: N = 1's budget is out of reach
    with pytest.raises(BudgetError, match=r"swis.cycles = 0.125 \(from swis.shared_bits = 1\) cannot be met .* set swis.cycles >= 0.8"):
        METHODS["swis"].quantize(g, stats, resolve("swis", {"swis.shared_bits": 1, "swis.scale_grid": 0, "overrides": pinned}))
    with pytest.raises(RecipeError, match="must be one of search, truncate"):
        resolve("swis", {"swis.positions": "msb"})
