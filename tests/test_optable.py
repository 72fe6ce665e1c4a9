"""One op table: every back end keeps one entry per op kind, and a missing one is named."""
from __future__ import annotations

import pytest

from ptq.export.integer import IntegerBuilder
from ptq.export.qdq import QdqBuilder
from ptq.ir import OP_KINDS, OP_TABLE, require_all
from ptq.ir.floatops import float_kernels
from ptq.manifest.build import RECORDERS
from ptq.manifest.validation import CHECKS, _shape_kernels
from ptq.runtime.reference import reference_kernels
from ptq.runtime.simulator import Simulator


def test_every_back_end_covers_exactly_the_op_table(digits_quantized):
    qm, _ = digits_quantized
    m = qm.manifest
    tables = {"float": float_kernels(), "manifest": RECORDERS, "validate": CHECKS, "shape": _shape_kernels(m),
              "reference": reference_kernels(m), "simulator": Simulator(m).kernels(),
              "qdq": QdqBuilder(m).emitters(), "int": IntegerBuilder(m).emitters()}
    for name, table in tables.items():
        assert sorted(table) == sorted(OP_KINDS), name


def test_op_table_facts():
    assert OP_TABLE["add"].arity == 2 and OP_TABLE["concat"].arity is None
    assert {k for k, v in OP_TABLE.items() if v.weighted} == {"conv", "linear"}
    assert not OP_TABLE["maxpool"].requantizes and OP_TABLE["lut"].requantizes
    assert "weight" in OP_TABLE["conv"].record and OP_TABLE["reshape"].record == ()


def test_a_back_end_missing_a_kind_is_named():
    table = {k: None for k in OP_KINDS if k != "lut"}
    with pytest.raises(KeyError, match=r"back end 'mine'.*missing \['lut'\]"):
        require_all("mine", table)
    with pytest.raises(KeyError, match=r"unknown \['attention'\]"):
        require_all("mine", {**{k: None for k in OP_KINDS}, "attention": None})
