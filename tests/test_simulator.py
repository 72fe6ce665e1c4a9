import numpy as np
import pytest
import torch

from ptq.ir import Op
from ptq.runtime.simulator import integer_gemm


@pytest.mark.parametrize("groups,cin,k,stride", [(1, 64, 3, 1), (32, 32, 3, 2), (1, 1152, 1, 1), (1, 2048, 1, 1)])
def test_integer_gemm_is_exact(groups, cin, k, stride):
    torch.manual_seed(0)
    op = Op("t", "conv", ["x"], "y", {"stride": [stride] * 2, "padding": [k // 2] * 2, "dilation": [1, 1], "groups": groups})
    q = torch.randint(-127, 128, (64, cin // groups, k, k)).float()
    u = torch.randint(-255, 256, (2, cin, 9, 9))
    got = integer_gemm(op, u, q).long()
    want = torch.nn.functional.conv2d(u.double(), q.double(), None, stride, k // 2, 1, groups).round().long()
    assert torch.equal(got, want)


def test_integer_gemm_linear_16bit_inputs():
    op = Op("t", "linear", ["x"], "y", {})
    q = torch.randint(-127, 128, (10, 300)).float()
    u = torch.randint(-65535, 65536, (4, 300))
    assert torch.equal(integer_gemm(op, u, q).long(), (u @ q.long().T))


def test_simulator_matches_reference_within_one_lsb(digits_quantized):
    qm, _ = digits_quantized
    num = qm.manifest.data["verification"]["numeric"]
    assert num["min_share_within_1lsb"] >= 0.999
    assert num["top1_agreement_sim_vs_reference"] >= 99.5
    assert num["ok"] is True


def test_simulate_returns_dequantized_numpy(digits, digits_quantized):
    import ptq
    model, _, _, xte, _ = digits
    _, out = digits_quantized
    y = ptq.load(out).simulate(xte[:16])
    assert isinstance(y, np.ndarray) and y.shape == (16, 10)
    with torch.no_grad():
        fp = model(torch.from_numpy(xte[:16])).numpy()
    assert (y.argmax(1) == fp.argmax(1)).mean() >= 0.9


def test_wrap_mode_counts_overflow_of_a_narrow_accumulator(digits_quantized):
    from ptq.runtime.simulator import Simulator
    qm, _ = digits_quantized
    sim = Simulator(qm.manifest, "wrap", bits=12)
    x = torch.randn(8, 1, 8, 8)
    sim(x)
    assert sum(s.overflows for s in sim.layers.values()) > 0
    exact = Simulator(qm.manifest, "exact")
    exact(x)
    assert sum(s.overflows for s in exact.layers.values()) == 0


def test_end_to_end_counts_flips_only_on_decisive_samples():
    from ptq.runtime.verify import DECISIVE_NOISE, end_to_end
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 10)) * 3
    ref[0, :2] = [5.0, 4.999]  # a near tie
    sim = ref + rng.normal(size=ref.shape) * 0.01  # 1-LSB-like noise everywhere
    sim[0, :2] = [4.999, 5.0]  # the tie flips
    r = end_to_end(sim, ref)
    assert r["top1_agreement_sim_vs_reference"] == pytest.approx(97.5)
    assert r["top1_agreement_decisive"] == 100.0 and r["decisive_samples"] == 39
    margin = np.sort(ref[1])[-1] - np.sort(ref[1])[-2]
    assert margin > DECISIVE_NOISE * r["logit_rms_difference"]
    sim[1] = ref[1]
    sim[1, np.argsort(ref[1])[-2]] += 2 * margin  # a systematic error flips a decisive sample
    r = end_to_end(sim, ref)
    assert r["top1_agreement_decisive"] < 99.5


@pytest.mark.parametrize("acc_bits", [None, 10])
def test_level2_compares_each_op_with_the_reference_on_the_simulators_inputs(digits, digits_quantized, acc_bits):
    """Level 2's per-tensor figures are, by definition, each op's simulator output against the
    reference kernel run on the simulator's own inputs: also downstream of a layer whose 10-bit
    accumulators wrap, where the two chains part and the shortcut to the reference chain's own
    output must not be taken."""
    from ptq.ir.graph import execute
    from ptq.runtime.reference import reference_kernels
    from ptq.runtime.simulator import Simulator
    from ptq.runtime.verify import numeric
    _, xtr, _, _, _ = digits
    qm, _ = digits_quantized
    m = qm.manifest
    x = torch.from_numpy(np.asarray(xtr[:16], np.float32))
    got = numeric(m, [x[:8], x[8:]], Simulator(m, "wrap" if acc_bits else None, acc_bits))["tensors"]
    sim, ref = Simulator(m, "wrap" if acc_bits else None, acc_bits), reference_kernels(m, torch.float64)
    counts: dict[str, list[int]] = {}
    for xb in (x[:8], x[8:]):
        def check(op, xs, y):
            d = (y.to(torch.float64) - ref[op.kind](op, [u.to(torch.float64) for u in xs])).abs()
            c = counts.setdefault(op.output, [0, 0, 0])
            c[0], c[1], c[2] = c[0] + int((d <= 1).sum()), c[1] + d.numel(), max(c[2], int(d.max()))
        execute(sim.graph, sim.quantize_input(xb), sim.kernels(), on_output=check)
    want = {t: {"share_within_1lsb": c[0] / c[1], "max_lsb_error": c[2]} for t, c in counts.items()}
    assert got == want
    assert (max(v["max_lsb_error"] for v in want.values()) > 1) == bool(acc_bits)


def test_reference_sums_integer_codes_exactly_and_gives_the_dequantized_codes(digits, digits_quantized, monkeypatch):
    """The float64 reference sums a single-term layer's integer codes in float32 (exact below 2^24)
    and scales once; on the digits CNN every layer takes that path, and every op's codes equal those
    of the dequantized float64 convolution it replaced (the path a layer past the bound keeps)."""
    import ptq.runtime.reference as reference
    from ptq.runtime.reference import Codec, _integer_weight, run_reference
    _, xtr, _, _, _ = digits
    qm, _ = digits_quantized
    m = qm.manifest
    assert all(_integer_weight(m, rec, Codec(m)) is not None for rec in m.weighted_ops())
    x = torch.from_numpy(np.asarray(xtr[:32], np.float32))
    keep = [rec["output"] for rec in m.ops]
    exact = run_reference(m, x, keep)
    monkeypatch.setattr(reference, "F32_EXACT", 0)  # no layer within the bound: all dequantized
    assert all(_integer_weight(m, rec, Codec(m)) is None for rec in m.weighted_ops())
    dequantized = run_reference(m, x, keep)
    for t in keep:
        assert torch.equal(exact[t], dequantized[t]), t
