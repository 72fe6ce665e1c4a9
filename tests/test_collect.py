"""Calibration statistics (calib/collect.py): the input patches every output error is built on."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ptq.calib.collect import layer_patches


@pytest.mark.parametrize("c,o,k,s,p,d,g", [(8, 16, 3, 1, 1, 1, 1), (8, 8, 3, 2, 1, 1, 8), (6, 12, 1, 1, 0, 1, 1),
                                           (4, 8, 5, 2, 2, 2, 2), (4, 4, 3, 1, 0, 1, 1)])
def test_patches_are_the_unfolded_input_of_each_group(c, o, k, s, p, d, g):
    op = SimpleNamespace(kind="conv", weight=np.zeros((o, c // g, k, k)),
                         attrs={"stride": (s, s), "padding": (p, p), "dilation": (d, d), "groups": g})
    x = torch.randn(3, c, 11, 12)
    got = layer_patches(op, x, None, None)  # every output position
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C·k·k, L), channel-major like a group's K
    want = cols.reshape(3, g, (c // g) * k * k, -1).permute(1, 0, 3, 2).reshape(g, -1, (c // g) * k * k)
    assert torch.equal(got, want)
    # sampled positions are a subset of those rows, the same for the same generator
    a = layer_patches(op, x, 7, torch.Generator().manual_seed(3))
    b = layer_patches(op, x, 7, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (g, 3 * min(7, want.shape[1] // 3), want.shape[2])
    rows = {tuple(r.tolist()) for r in want[0]}
    assert all(tuple(r.tolist()) in rows for r in a[0])


@pytest.mark.parametrize("positions", [None, 9])
def test_a_depthwise_layer_s_moments_taken_a_few_groups_at_a_time_are_those_of_all_its_patches(monkeypatch, positions):
    import ptq.calib.collect as collect
    op = SimpleNamespace(kind="conv", weight=torch.zeros(20, 1, 3, 3), attrs={"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 20})
    op.weight_matrix_shape = (20, 9)
    x = torch.randn(4, 20, 9, 10)
    whole = collect.moments_of(layer_patches(op, x, positions, torch.Generator().manual_seed(5)))
    monkeypatch.setattr(collect, "PART_ELEMENTS", 1)  # parts of 8, 8 and 4 groups
    monkeypatch.setattr(collect, "cheaper_by_shifts", lambda *a: False)  # the copying path
    parts = collect.patch_moments(op, x, positions, torch.Generator().manual_seed(5))
    assert np.array_equal(parts.xx, whole.xx) and np.array_equal(parts.x, whole.x) and parts.count == whole.count == 4 * (positions or 25)
    p = layer_patches(op, x, positions, torch.Generator().manual_seed(5)).double()
    assert np.allclose(parts.xx, (p.transpose(1, 2) @ p).numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,padding,dilation,size,positions", [
    (3, 1, 1, 1, (9, 10), None), (3, 2, 1, 1, (9, 10), 9), (5, 1, 2, 1, (11, 7), None),
    (5, 2, 0, 1, (13, 13), 7), (3, 1, 2, 2, (8, 9), 11), (1, 1, 0, 1, (5, 6), None)])
def test_a_depthwise_layer_s_moments_from_shifted_maps_are_those_of_its_patches(monkeypatch, kernel, stride, padding,
                                                                                 dilation, size, positions):
    import ptq.calib.collect as collect
    c = 6
    op = SimpleNamespace(kind="conv", weight=torch.zeros(c, 1, kernel, kernel), attrs={
        "stride": (stride, stride), "padding": (padding, padding), "dilation": (dilation, dilation), "groups": c})
    op.weight_matrix_shape = (c, kernel * kernel)
    x = torch.randn(5, c, *size) + 0.5
    monkeypatch.setattr(collect, "cheaper_by_shifts", lambda *a: True)
    shifted = collect.patch_moments(op, x, positions, torch.Generator().manual_seed(4))
    p = layer_patches(op, x, positions, torch.Generator().manual_seed(4)).double()
    assert shifted.count == p.shape[1]
    assert np.allclose(shifted.xx, (p.transpose(1, 2) @ p).numpy(), rtol=1e-5, atol=1e-4)
    assert np.allclose(shifted.x, p.sum(1).numpy(), rtol=1e-5, atol=1e-4)
    assert np.array_equal(shifted.xx, shifted.xx.transpose(0, 2, 1))


def test_shifted_maps_are_taken_where_most_positions_are_kept_and_patches_copied_where_few_are():
    from ptq.calib.shifted import cheaper_by_shifts
    assert cheaper_by_shifts(5, 5, 18, 18, 14 * 14)  # Lite0's 14×14 5×5 layers: every position kept
    assert cheaper_by_shifts(3, 3, 16, 16, 14 * 14)
    assert not cheaper_by_shifts(3, 3, 113, 113, 256)  # 256 of a 56×56 map's positions
    assert not cheaper_by_shifts(5, 5, 59, 59, 256)


def _split(x: torch.Tensor, rng: np.random.Generator) -> list[torch.Tensor]:
    """x cut at random points into pieces, in a random order."""
    cuts = np.sort(rng.choice(np.arange(1, x.numel()), size=6, replace=False))
    pieces = list(torch.tensor_split(x.flatten(), cuts.tolist()))
    return [pieces[i] for i in rng.permutation(len(pieces))]


@pytest.mark.parametrize("values", [
    lambda g: torch.randn(5000, generator=g),  # two-sided
    lambda g: torch.rand(5000, generator=g) * 6.0,  # ReLU6-like, one-sided
    lambda g: -torch.rand(5000, generator=g) * 1e-30,  # tiny and negative
    lambda g: torch.randn(5000, generator=g) * 1e30,  # huge
    lambda g: torch.cat([torch.randn(4999, generator=g), torch.tensor([3e4])]),  # one far outlier
    lambda g: torch.full((5000,), 0.7),  # constant
    lambda g: torch.zeros(5000),  # dead
], ids=["normal", "relu6", "tiny", "huge", "outlier", "constant", "zeros"])
def test_histograms_merged_in_any_grouping_and_order_are_the_histogram_of_all_values(values):
    """One streaming pass merges each batch's histogram into the running one: the counts must be those
    of the whole data's grid, however the values arrive, and the grid must resolve the range."""
    from ptq.calib.observers import HIST_BINS, Histogram
    x = values(torch.Generator().manual_seed(0))
    whole = Histogram.of(x)
    assert (whole.lo, whole.hi) == (float(x.min()), float(x.max()))
    assert whole.counts.sum() == x.numel() and whole.counts.size <= HIST_BINS
    width = 2.0 ** whole.exp
    if whole.hi > whole.lo:  # bins at most twice as wide as HIST_BINS equal bins would be
        assert width <= 2 * (whole.hi - whole.lo) / HIST_BINS
    centers = whole.centers()
    assert centers[0] - width / 2 <= whole.lo and whole.hi < centers[-1] + width / 2
    rng = np.random.default_rng(1)
    for _ in range(3):
        merged = Histogram.empty()
        for piece in _split(x, rng):
            merged = merged.merge(Histogram.of(piece))
        assert (merged.lo, merged.hi, merged.exp, merged.start) == (whole.lo, whole.hi, whole.exp, whole.start)
        assert np.array_equal(merged.counts, whole.counts)


def test_fixed_point_moment_sums_are_the_same_bits_in_any_grouping_and_close_to_the_float64_sum():
    """Each addend picks its own unit from its own bound, so the sum of batches whose peaks differ by
    orders of magnitude is one set of integers whatever the order."""
    from ptq.calib.exactsum import FixedSum
    rng = np.random.default_rng(0)
    addends = [(rng.standard_normal((3, 4)) * s).astype(np.float32).astype(np.float64) for s in (1e-3, 1.0, 7.0, 1e3, 0.5)]
    bounds = [2.0 * 100 * np.abs(a).max() for a in addends]
    totals = []
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        s = FixedSum((3, 4))
        for i in order:
            s.add(addends[i], bounds[i])
        totals.append(s.value())
    assert all(np.array_equal(t, totals[0]) for t in totals)
    exact = np.sum(addends, axis=0)
    assert np.allclose(totals[0], exact, rtol=0, atol=1e-12 * np.abs(exact).max())


@pytest.mark.parametrize("k", [1, 7, 255, 256, 257, 700])
def test_symmetric_stacks_unpack_from_their_upper_triangles_bit_for_bit(k):
    from ptq.calib.packed import pack_upper, unpack_upper
    a = torch.randn(3, 2 * k + 1, k, generator=torch.Generator().manual_seed(k)).double()
    s = (a.transpose(1, 2) @ a).numpy()  # sums of products, as the moments are
    s = (s + s.transpose(0, 2, 1)) / 2  # exactly symmetric whatever the BLAS
    packed = pack_upper(s)
    assert packed.shape == (3, k * (k + 1) // 2)
    assert np.array_equal(unpack_upper(packed, k), s)
    s[1, 0, k - 1] += 1e-9 if k > 1 else 0.0
    assert (pack_upper(s) is None) == (k > 1)  # not symmetric: not packed


def test_a_dense_layer_s_moments_are_held_in_half_the_memory_with_the_same_bits():
    from ptq.calib.collect import LayerInputStats, PACK_MIN
    k = 2 * PACK_MIN
    p = torch.randn(1, 500, k, generator=torch.Generator().manual_seed(0)).double()
    xx = (p.transpose(1, 2) @ p).numpy()
    xx = (xx + xx.transpose(0, 2, 1)) / 2
    held = LayerInputStats(xx.copy(), p.sum(1).numpy(), 500, pack=True)
    whole = LayerInputStats(xx.copy(), p.sum(1).numpy(), 500)
    assert held._packed is not None and held._packed.nbytes < 0.51 * xx.nbytes
    assert np.array_equal(held.xx, xx) and np.array_equal(held.hessian, whole.hessian)
    assert np.array_equal(held.hessian, xx / 500) and held.full_nbytes == whole.full_nbytes == xx.nbytes
    xx[0, 0, 1] = np.nextafter(xx[0, 0, 1], np.inf)  # one last bit off symmetry: held whole
    assert LayerInputStats(xx, p.sum(1).numpy(), 500, pack=True)._packed is None


def test_a_grouped_conv_samples_its_own_positions_and_the_sequential_h_does_too(monkeypatch):
    """`calibration.grouped_positions` sets the rows of a depthwise conv's H (a kernel's taps wide),
    `positions` those of every other conv, in the statistics pass and in the rounding engine's
    sequential pass."""
    import ptq
    import ptq.methods.rounding as rounding
    from ptq.api import as_source
    from ptq.calib.collect import collect_statistics
    from ptq.ir.capture import capture
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    x = np.random.default_rng(0).standard_normal((12, 3, 10, 10)).astype(np.float32)
    graph = capture(model, (3, 10, 10))
    src = as_source(x, {"input_shape": [3, 10, 10]}, 12, 0, "calib")
    names = [op.name for op in graph.weighted_ops()]  # dense 3×3, depthwise 3×3, dense 1×1
    for grouped in (5, 100, 40):
        stats = collect_statistics(graph, src, batch_size=4, positions=30, grouped_positions=grouped)
        assert [stats.layer_inputs[n].count for n in names] == [12 * 30, 12 * grouped, 12 * 30]
    seen = {}
    sequential = rounding.sequential_moments

    def spy(op, xq, xf, positions, size, workers=None):
        seen[op.name] = positions
        return sequential(op, xq, xf, positions, size, workers)

    monkeypatch.setattr(rounding, "sequential_moments", spy)
    ptq.quantize(model, x, "bitplane-4.5", eval_size=0, overrides={"calibration.positions": 30, "calibration.grouped_positions": 5})
    assert [seen[n] for n in names] == [30, 5, 30]


def test_statistics_without_layer_moments_hold_the_same_ranges_and_serve_only_recipes_that_read_none():
    """`calibration.layer_moments = false` skips every layer's H: the histograms are the same bits
    (the pass runs the same forward), the layer inputs are empty, and a prepared model without them
    quantizes a nearest-rounding uniform recipe to the integers one with them gives, but refuses a
    recipe that reads them."""
    import ptq
    from ptq.api import prepare, quantize_prepared
    from ptq.errors import RecipeError
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU6(),
                                torch.nn.Conv2d(8, 4, 1)).eval()
    x = np.random.default_rng(1).standard_normal((24, 3, 10, 10)).astype(np.float32)
    fast = {"weights.rounding": "nearest", "bias_correction.mode": "depthwise"}
    full = prepare(model, x, "w8a8", eval_size=0, overrides=fast)
    lean = prepare(model, x, "w8a8", eval_size=0, overrides={**fast, "calibration.layer_moments": False})
    assert lean.stats.layer_inputs == {} and len(full.stats.layer_inputs) == 3
    for name, h in full.stats.histograms.items():
        g = lean.stats.histograms[name]
        assert (g.lo, g.hi) == (h.lo, h.hi) and np.array_equal(g.counts, h.counts)
    over = {**fast, "calibration.layer_moments": False}
    a, b = quantize_prepared(full, "w8a8", over), quantize_prepared(lean, "w8a8", over)
    assert a.manifest.tensors.keys() == b.manifest.tensors.keys()
    assert all(np.array_equal(a.manifest.tensors[k], b.manifest.tensors[k]) for k in a.manifest.tensors)
    with pytest.raises(RecipeError, match="skipped"):
        quantize_prepared(lean, "w8a8", fast)  # feedback rounding's recipe reads H; these statistics have none
    with pytest.raises(RecipeError, match="calibration.positions"):
        quantize_prepared(full, "w8a8", {**fast, "calibration.positions": 7})
    assert ptq.quantize(model, x, "w8a8-fast", eval_size=0).report["verification"]["verified"]
