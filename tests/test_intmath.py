import numpy as np
import torch

from ptq.intmath import dyadic_shared, dyadic_value, rounding_shift


def test_dyadic_multipliers_are_31_bit_and_accurate():
    rng = np.random.default_rng(0)
    M = np.exp(rng.uniform(np.log(1e-9), np.log(0.9), 1000))
    m, n = dyadic_shared(M[None, :])
    m = m[0]
    assert np.all((m >= 2**30) & (m < 2**31))
    assert np.all(np.abs(dyadic_value(m, n) / M - 1) < 2**-30)


def test_dyadic_shared_keeps_one_shift_per_column():
    M = np.array([[0.5, 1e-3], [0.25, 1e-4]])
    m, n = dyadic_shared(M)
    assert m.shape == (2, 2) and n.shape == (2,)
    assert np.all(m < 2**31)
    assert np.allclose(m / np.exp2(n)[None, :], M, rtol=1e-6)


def test_rounding_shift_is_round_half_up():
    v = torch.arange(-5000, 5000, dtype=torch.int64)
    for n in (1, 3, 7):
        got = rounding_shift(v, torch.tensor(n))
        want = torch.floor(v.double() / 2**n + 0.5).long()
        assert torch.equal(got, want)


def test_dyadic_sum_float_path_equals_int64_rounding_shift():
    """The float64 fast path must give the int64 integers bit for bit, ties and mixed channels included."""
    from ptq.intmath import _int_dyadic_sum, dyadic_sum
    g = torch.Generator().manual_seed(0)
    c = 6
    shift = torch.tensor([4, 20, 33, 45, 52, 52]).reshape(1, c, 1, 1)
    mult = torch.randint(2**30, 2**31, (1, c, 1, 1), generator=g)
    acc = torch.randint(-2**21, 2**21, (3, c, 5, 5), generator=g).to(torch.float64)
    acc[2, 5] = 2.0 ** 27  # a channel beyond the float bound: recomputed in int64
    bound = acc.abs().amax(dim=(0, 2, 3), keepdim=True)
    got = dyadic_sum([acc], [mult], shift, [bound])
    assert torch.equal(got, _int_dyadic_sum([acc], [mult], shift))
    ties = torch.tensor([8.0, -8.0, 24.0, -24.0]).reshape(1, 4, 1, 1)  # ±0.5 and ±1.5 after the shift by 4
    got = dyadic_sum([ties], [torch.ones(1, 4, 1, 1, dtype=torch.int64)], torch.full((1, 4, 1, 1), 4), [ties.abs()])
    assert got.flatten().tolist() == [1.0, 0.0, 2.0, -1.0]  # round half up
