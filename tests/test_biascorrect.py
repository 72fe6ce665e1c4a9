"""Bias correction (ptq/biascorrect.py): the `auto` candidates computed in one sweep."""
import copy

import numpy as np
import pytest
import torch

from ptq.api import prepare, stage_manifest, stage_method
from ptq.biascorrect import correct_biases
from ptq.manifest import Manifest
from ptq.manifest.build import set_bias

MODES = ["none", "depthwise", "all", "layer"]


def _depthwise_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU6(),
        torch.nn.Conv2d(8, 12, 1), torch.nn.ReLU(),
        torch.nn.Conv2d(12, 12, 3, stride=2, padding=1, groups=12), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(12 * 4 * 4, 10)).eval()


def _copy(m: Manifest) -> Manifest:
    return Manifest(copy.deepcopy(m.data), dict(m.tensors))


def test_candidates_sharing_their_stream_get_what_each_gets_alone(digits, monkeypatch):
    """`none`/`depthwise` and `all`/`layer` share their fake-quant tensors until a decision parts
    them; each candidate's biases, decisions and output are those of a sweep with it alone."""
    import ptq.biascorrect as bc
    _, xtr, _, _, _ = digits
    x = xtr[:64]
    prep = prepare(_depthwise_cnn(), x, "w4a8", eval_size=0)
    m = stage_manifest(prep, prep.recipe, stage_method(prep.graph, prep.stats, prep.recipe))
    xt = torch.from_numpy(x)
    second = prep.graph.weighted_ops()[2].name  # the 1×1 conv after the first depthwise one
    measure = bc._measure_layer

    def rejecting(op, *a, **k):  # the layer mode turns this correction down (it lowers the error here)
        delta, y0, y1, better = measure(op, *a, **k)
        return delta, y0, y1, (False if op.name == second and better is not None else better)

    monkeypatch.setattr(bc, "_measure_layer", rejecting)
    trials = [_copy(m) for _ in MODES]
    kept, fp, fqs = correct_biases(prep.graph, trials, xt, MODES)
    assert kept[0] == {} and set(kept[1]) < set(kept[2]) and kept[2][second] and not kept[3][second]
    for mode, trial, k, fq in zip(MODES, trials, kept, fqs):
        alone = _copy(m)
        (k1,), fp1, (fq1,) = correct_biases(prep.graph, [alone], xt, [mode])
        assert k1 == k and torch.equal(fp1, fp) and torch.equal(fq1, fq), mode
        for a, b in zip(alone.weighted_ops(), trial.weighted_ops()):
            assert a["bias"] == b["bias"], (mode, a["name"])
        assert alone.tensors.keys() == trial.tensors.keys()
        assert all(np.array_equal(v, trial.tensors[r]) for r, v in alone.tensors.items())


def _biases(m: Manifest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {r["name"]: (m.tensor(r["bias"]["q"]), m.tensor(r["bias"]["float"])) for r in m.weighted_ops()}


def test_without_the_layer_judge_no_float_map_of_every_sample_is_held(digits, monkeypatch):
    """Only `layer` compares each layer's codes with the FP32 maps; the other modes read the FP32
    side's per-channel sums alone, taken a mini-batch at a time through the whole network, and never
    stitch the uncorrected codes of a corrected layer (the same biases: the test above)."""
    import ptq.biascorrect as bc
    _, xtr, _, _, _ = digits
    prep = prepare(_depthwise_cnn(), xtr[:32], "w4a8", eval_size=0)
    m = stage_manifest(prep, prep.recipe, stage_method(prep.graph, prep.stats, prep.recipe))
    xt = torch.from_numpy(xtr[:32])
    held, uncorrected = [], []
    float_layer, measure = bc._float_layer, bc._measure_layer

    def counting_float_layer(op, *a, **k):
        held.append(op.name)
        return float_layer(op, *a, **k)

    def counting_measure(*a, **k):
        out = measure(*a, **k)
        uncorrected.append(out[1] is not None)
        return out

    monkeypatch.setattr(bc, "_float_layer", counting_float_layer)
    monkeypatch.setattr(bc, "_measure_layer", counting_measure)
    correct_biases(prep.graph, [_copy(m) for _ in MODES[:3]], xt, MODES[:3])
    assert held == [] and uncorrected and not any(uncorrected)
    correct_biases(prep.graph, [_copy(m)], xt, ["layer"])
    assert {op.name for op in prep.graph.weighted_ops()} <= set(held) and any(uncorrected)


def test_mini_batches_move_no_decision_and_recomputing_moves_no_bit(digits, monkeypatch):
    """Each op runs `CHUNK` samples at a time (bounded memory on large models). 64 samples in four
    mini-batches keep every `layer` decision of one batch of 64, with the float biases equal to float
    rounding and the int32 ones within one step; recomputing the quantized pre-activations instead of
    holding them for the second pass, or giving every output a new tensor instead of an input's
    memory, gives the same bits."""
    import ptq.biascorrect as bc
    _, xtr, _, _, _ = digits
    x = xtr[:64]
    prep = prepare(_depthwise_cnn(), x, "w4a8", eval_size=0)
    m = stage_manifest(prep, prep.recipe, stage_method(prep.graph, prep.stats, prep.recipe))
    xt = torch.from_numpy(x)

    def sweep(chunk: int, hold: int):
        monkeypatch.setattr(bc, "CHUNK", chunk)
        monkeypatch.setattr(bc, "HOLD_BYTES", hold)
        trial = _copy(m)
        (kept,), fp, (fq,) = correct_biases(prep.graph, [trial], xt, ["layer"])
        return kept, fp, fq, _biases(trial)

    whole, held, recomputed = sweep(64, 1 << 30), sweep(16, 1 << 30), sweep(16, 0)
    stitch = bc._stitch
    monkeypatch.setattr(bc, "_stitch", lambda parts, chunk, spare=(), take=None: stitch(parts, chunk, (), take))
    fresh = sweep(16, 1 << 30)
    assert whole[0] == held[0] and any(whole[0].values())
    for name, (q, f) in whole[3].items():
        assert np.abs(held[3][name][0].astype(np.int64) - q).max() <= 1, name
        np.testing.assert_allclose(held[3][name][1], f, rtol=1e-5, atol=1e-6, err_msg=name)
    for other in (recomputed, fresh):
        assert held[0] == other[0] and torch.equal(held[1], other[1]) and torch.equal(held[2], other[2])
        for name, (q, f) in held[3].items():
            assert np.array_equal(other[3][name][0], q) and np.array_equal(other[3][name][1], f), name


def test_outputs_written_into_dying_inputs_change_no_candidate(digits, monkeypatch):
    """An op's output may take the memory of an input it reads for the last time, in the FP32 stream
    and in a candidate's codes when no other candidate shares them. On the digits CNN (a residual add;
    four candidates parting at different layers) every candidate gets the same bits as with a new
    tensor for every output, and some outputs did take an input's memory."""
    import ptq.biascorrect as bc
    model, xtr, _, _, _ = digits
    prep = prepare(model, xtr[:64], "w4a8", eval_size=0)
    m = stage_manifest(prep, prep.recipe, stage_method(prep.graph, prep.stats, prep.recipe))
    xt = torch.from_numpy(xtr[:64])
    stitch, reused = bc._stitch, []

    def counting(parts, chunk, spare=(), take=None):
        out = stitch(parts, chunk, spare, take)
        reused.append(any(out is t for t in spare) and out.dtype == torch.uint8)
        return out

    def sweep():
        trials = [_copy(m) for _ in MODES]
        kept, fp, fqs = correct_biases(prep.graph, trials, xt, MODES)
        return kept, fp, fqs, [_biases(t) for t in trials]

    monkeypatch.setattr(bc, "_stitch", counting)
    a = sweep()
    assert any(reused)  # some candidate's codes went into an input's memory
    monkeypatch.setattr(bc, "_stitch", lambda parts, chunk, spare=(), take=None: stitch(parts, chunk, (), take))
    b = sweep()
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    for ba, bb in zip(a[3], b[3]):
        for name, (q, f) in ba.items():
            assert np.array_equal(bb[name][0], q) and np.array_equal(bb[name][1], f), name


class _PadReadTwice(torch.nn.Module):
    """A pad whose input an add reads after it, before the conv reads the pad: the add's output must
    not take the memory the conv still reads through the pad."""

    def __init__(self):
        super().__init__()
        self.first, self.pad, self.second = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ZeroPad2d(1), torch.nn.Conv2d(8, 8, 3)
        self.head = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        a = torch.relu(self.first(x))
        p = self.pad(a)
        d = a + a
        return self.head((self.second(p) + d).flatten(1))


def _padded_sequential() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU6(), torch.nn.ZeroPad2d((0, 1, 0, 1)),
        torch.nn.Conv2d(8, 8, 3, stride=2, groups=8), torch.nn.ReLU6(), torch.nn.Conv2d(8, 12, 1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(12 * 4 * 4, 10))


@pytest.mark.parametrize("build", [_padded_sequential, _PadReadTwice])
def test_pads_computed_when_read_give_the_bits_of_held_pads(digits, monkeypatch, build):
    """A pad's output is computed per mini-batch when the op after it reads it (`LAZY_KINDS`), not held
    (EfficientNet-Lite0's 17 "same" pads held a second copy of its largest maps): every candidate gets
    the bits it gets with the pads held."""
    import ptq.biascorrect as bc
    _, xtr, _, _, _ = digits
    torch.manual_seed(0)
    model = build().eval()
    prep = prepare(model, xtr[:64], "w4a8", eval_size=0)
    assert "pad" in {op.kind for op in prep.graph.ops}
    m = stage_manifest(prep, prep.recipe, stage_method(prep.graph, prep.stats, prep.recipe))
    xt = torch.from_numpy(xtr[:64])

    def sweep():
        trials = [_copy(m) for _ in MODES]
        kept, fp, fqs = correct_biases(prep.graph, trials, xt, MODES)
        return kept, fp, fqs, [_biases(t) for t in trials]

    lazy = sweep()
    monkeypatch.setattr(bc, "LAZY_KINDS", ())
    held = sweep()
    assert lazy[0] == held[0] and any(any(k.values()) for k in lazy[0])
    assert torch.equal(lazy[1], held[1]) and all(torch.equal(a, b) for a, b in zip(lazy[2], held[2]))
    for ba, bb in zip(lazy[3], held[3]):
        for name, (q, f) in ba.items():
            assert np.array_equal(bb[name][0], q) and np.array_equal(bb[name][1], f), name


def test_a_layers_correction_starts_from_the_manifests_bias(digits, monkeypatch):
    """A bias the method moved (learned rounding's `rounding.bias_rate`) is where the correction
    starts: the first layer's corrected bias removes the same mean shift whatever bias it starts
    from, and a rejected correction leaves the stream on the manifest's bias."""
    import ptq.biascorrect as bc
    _, xtr, _, _, _ = digits
    x = torch.from_numpy(xtr[:32])
    prep = prepare(_depthwise_cnn(), xtr[:32], "w4a8", eval_size=0)
    m = stage_manifest(prep, prep.recipe, stage_method(prep.graph, prep.stats, prep.recipe))
    base = m.tensor(m.weighted_ops()[0]["bias"]["float"])
    moved = _copy(m)
    set_bias(moved, moved.weighted_ops()[0], base + np.random.default_rng(0).normal(0, 0.5, base.shape))
    fixed, from_moved = _copy(m), _copy(moved)
    correct_biases(prep.graph, [fixed, from_moved], x, ["all", "all"])
    first = [t.tensor(t.weighted_ops()[0]["bias"]["float"]) for t in (fixed, from_moved)]
    assert np.allclose(first[1], first[0], rtol=0, atol=1e-5 * np.abs(base).max())
    measure = bc._measure_layer
    monkeypatch.setattr(bc, "_measure_layer", lambda *a, **k: (*measure(*a, **k)[:3], False))
    (kept, _), _, (rejected, plain) = correct_biases(prep.graph, [_copy(moved), _copy(moved)], x, ["layer", "none"])
    (_, _), _, (_, unmoved) = correct_biases(prep.graph, [_copy(m), _copy(m)], x, ["layer", "none"])
    assert not any(kept.values())
    assert (rejected - plain).abs().max() < 0.1 * (plain - unmoved).abs().max()


def test_auto_chosen_on_a_spread_subset_gives_the_biases_of_that_mode_on_all(digits):
    """`auto` compares its candidates on `choose_on` of the samples spread evenly over them (not the
    first ones), then corrects in the chosen mode on all of them: the biases of that mode alone on
    all the samples, whichever it chose; the card names the choice and its sample count."""
    from ptq.biascorrect import choose_and_correct, spread
    from ptq.card import card_fields
    _, xtr, _, _, _ = digits
    xt = torch.from_numpy(xtr[:64])
    assert torch.equal(spread(xt, 4), xt[[0, 16, 32, 48]]) and spread(xt, 64) is xt
    prep = prepare(_depthwise_cnn(), xtr[:64], "w4a8", eval_size=0)
    m = stage_manifest(prep, prep.recipe, stage_method(prep.graph, prep.stats, prep.recipe))
    chosen = {}
    for n in (16, 64):
        sub = _copy(m)
        info = choose_and_correct(prep.graph, sub, xt, "auto", choose_on=n)
        assert info["chosen_on"] == n and set(info["calibration_kl"]) == {"none", "depthwise", "all"}
        alone = _copy(m)
        corrected = choose_and_correct(prep.graph, alone, xt, info["chosen"])["corrected"]
        assert info["corrected"] == corrected
        assert all(np.array_equal(v, sub.tensors[r]) for r, v in alone.tensors.items())
        chosen[n] = info["chosen"]
        sub.data["bias_correction"] = info
        line = card_fields(sub, None, None)["bias_correction"]
        assert line.startswith(f"auto, chose {info['chosen']} on {n} samples (")
    assert chosen[16] != "none" and chosen[64] != "none"  # a 4-bit depthwise network needs a correction


def test_auto_keeps_the_simplest_candidate_within_its_margin_of_the_lowest_kl():
    """Lite0 `w8a8`'s calibration KLs on two draws (none, depthwise, all): `all` 4% under
    `depthwise` is a tie, and `depthwise` stays; `all` 6% under `depthwise` is chosen; a candidate
    ahead of every simpler one by more than the margin is chosen, else the simplest."""
    from ptq.biascorrect import AUTO_CANDIDATES, CHOICE_MARGIN, simplest_within
    assert AUTO_CANDIDATES == ("none", "depthwise", "all")
    assert AUTO_CANDIDATES[simplest_within([0.0094, 0.003536, 0.003399], CHOICE_MARGIN)] == "depthwise"
    assert AUTO_CANDIDATES[simplest_within([0.00838, 0.003766, 0.003539], CHOICE_MARGIN)] == "all"
    assert AUTO_CANDIDATES[simplest_within([0.01, 0.02, 0.03], CHOICE_MARGIN)] == "none"
    assert simplest_within([0.5, 0.2, 0.2], 0.0) == 1


def test_the_statistics_pass_sums_stand_in_for_the_fp32_pass(digits, monkeypatch):
    """The statistics pass sums each layer's FP32 pre-activation over the first
    `bias_correction.samples` samples (40 here: two batches of 16 and 8 rows of a third), and
    bias correction over those samples reads them instead of running the FP32 model again: each
    layer's sums within float32 rounding of the FP32 pass's, the same corrections kept, float
    biases within 1e-6 of those, and the manifest's integer biases the same."""
    import ptq.biascorrect as bc
    from ptq.api import stage_bias_correction
    _, xtr, _, _, _ = digits
    prep = prepare(_depthwise_cnn(), xtr[:64], "w4a8", eval_size=0, overrides={"bias_correction.samples": 40})
    assert prep.stats.pre_act_rows == 40
    m = stage_manifest(prep, prep.recipe, stage_method(prep.graph, prep.stats, prep.recipe))
    xt = torch.from_numpy(xtr[:40])
    sums, _ = bc._float_sums(prep.graph, xt, bc._chunks(40), None)
    assert set(prep.stats.pre_act_sums) == set(sums) == {op.name for op in prep.graph.weighted_ops()}
    for name, (total, count) in prep.stats.pre_act_sums.items():
        assert count == sums[name].count
        assert np.allclose(total, sums[name].total.numpy(), rtol=1e-5, atol=1e-4 * count), name
    given, computed = _copy(m), _copy(m)
    (k1,), fp1, _ = correct_biases(prep.graph, [given], xt, ["all"], prep.stats.pre_act_sums)
    (k2,), fp2, _ = correct_biases(prep.graph, [computed], xt, ["all"])
    assert fp1 is None and fp2 is not None and k1 == k2 and all(k1.values())
    for name, (q, f) in _biases(given).items():
        q2, f2 = _biases(computed)[name]
        assert np.array_equal(q, q2) and np.allclose(f, f2, rtol=0, atol=1e-6), name
    # the quantize stage takes them only where they cover its samples
    given_sums = []

    def spy(graph, ms, x, modes, float_sums=None):
        given_sums.append(float_sums)
        return real(graph, ms, x, modes, float_sums)

    real = bc.correct_biases
    monkeypatch.setattr(bc, "correct_biases", spy)
    for samples in (40, 48):
        stage_bias_correction(prep.graph, _copy(m), prep.source, {**prep.recipe, "bias_correction": {
            "mode": "all", "samples": samples, "choose_samples": 32}}, prep.stats)
    assert given_sums[0] is prep.stats.pre_act_sums and given_sums[1] is None
