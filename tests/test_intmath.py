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
