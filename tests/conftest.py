"""Shared fixtures: the benchmark's small CNN trained on scikit-learn digits (real labelled data)."""
from __future__ import annotations

import os

import pytest

from benchmarks.digits import digits_data, train

os.environ.setdefault("PTQ_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def digits():
    """(model, x_train, y_train, x_test, y_test) with the model trained for a few seconds."""
    xtr, ytr, xte, yte = digits_data()
    return train(), xtr, ytr, xte, yte


@pytest.fixture(scope="session")
def digits_quantized(digits, tmp_path_factory):
    """The digits model quantized W8A8 and saved; (QuantizedModel, directory)."""
    import ptq
    model, xtr, ytr, xte, yte = digits
    qm = ptq.quantize(model, xtr[:256], "w8a8", eval_data=xte[:128])
    out = tmp_path_factory.mktemp("q") / "digits-w8a8"
    qm.save(out)
    return qm, out
