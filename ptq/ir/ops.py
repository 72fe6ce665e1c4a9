"""The op table: every op kind of the integer op set, described once.

Each kind says how many inputs it takes, whether its output gets an encoding of its own (the op
requantizes) or passes its first input's codes through, whether it carries weights, and which
fields its manifest record holds beyond name, kind, inputs, output and attrs. Every back end (float
executor, manifest builder and validator, fake-quant reference, integer simulator, the ONNX
emitters) keeps one table keyed by these kinds and checks it with `require_all`, so a kind that
one back end lacks is an error at import, not a surprise at run time. Adding an op is one entry
here plus one kernel or emitter per back end (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, TypeVar


@dataclass(frozen=True)
class OpKind:
    """One op kind. `arity` None means one or more inputs; `requantizes` False means the output
    reuses the first input's encoding (integer codes pass through unchanged)."""

    name: str
    arity: int | None
    requantizes: bool
    weighted: bool
    record: tuple[str, ...]


OP_TABLE: dict[str, OpKind] = {k.name: k for k in (
    OpKind("conv", 1, True, True, ("weight", "bias", "requant", "clamp", "accumulator")),
    OpKind("linear", 1, True, True, ("weight", "bias", "requant", "clamp", "accumulator")),
    OpKind("add", 2, True, False, ("requant", "clamp")),
    OpKind("avgpool", 1, True, False, ("requant", "clamp")),
    OpKind("concat", None, True, False, ("requant", "clamp")),
    OpKind("lut", 1, True, False, ("table",)),
    OpKind("maxpool", 1, False, False, ("pad_value",)),
    OpKind("clamp", 1, False, False, ("clamp",)),
    OpKind("reshape", 1, False, False, ()),
    OpKind("pad", 1, False, False, ("pad_value",)),
    OpKind("matmul", 2, True, False, ("requant", "clamp")),
    OpKind("scale", 1, True, False, ("requant", "clamp")),
    OpKind("layernorm", 1, True, False, ("norm", "clamp")),
    OpKind("softmax", None, True, False, ("exp",)),  # scores, and optionally a keep mask (0 drops a key)
    OpKind("embedding", 1, True, False, ("embedding",)),
    OpKind("offset", 1, True, False, ("requant", "offset", "clamp")),  # x padded with constant rows, plus a constant
    OpKind("permute", 1, False, False, ()),
    OpKind("slice", 1, False, False, ()),
)}

OP_KINDS = tuple(OP_TABLE)
REQUANT_KINDS = tuple(k for k, v in OP_TABLE.items() if v.requantizes)
PASSTHROUGH_KINDS = tuple(k for k, v in OP_TABLE.items() if not v.requantizes)
WEIGHTED_KINDS = tuple(k for k, v in OP_TABLE.items() if v.weighted)
# elementwise functions run as lookup tables on codes of at most 8 bits
LUT_FUNCTIONS = ("hardswish", "sigmoid", "silu", "gelu", "tanh", "hardsigmoid")
# GELU with approximate="tanh" is the table function "gelu_tanh"

T = TypeVar("T", bound=Mapping)


def require_all(backend: str, table: T) -> T:
    """`table` (op kind -> kernel, emitter or check) must cover exactly the op table's kinds."""
    missing = [k for k in OP_KINDS if k not in table]
    extra = [k for k in table if k not in OP_TABLE]
    if missing or extra:
        raise KeyError(f"back end '{backend}' does not match the op table: missing {missing}, unknown {extra}")
    return table
