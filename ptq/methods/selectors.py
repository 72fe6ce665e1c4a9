"""Which conv/linear layers an `[[overrides]]` entry selects: by structure, or by module name.

A recipe meant for any model names layers by what they are, never by one model's module names.
Each entry of `layers = [...]` is one selector; an override applies to the union of its selectors.
Positions count the weighted (conv/linear) layers in graph order, the order the model runs them.

| selector | selects |
|---|---|
| `first`, `last` | the first / last weighted layer |
| `first:N`, `last:N` | the first / last N weighted layers |
| `early:F`, `late:F` | the layers that lie wholly within the first / last fraction F (0 < F ≤ 1) of the network's weights, counted in graph order by number of weights (biases excluded) |
| `conv`, `linear` | every conv / every linear layer |
| `depthwise` | convs with one input channel per group (`ptq.ir.is_depthwise`) |
| `grouped` | convs with more than one group (depthwise included) |
| `params<K`, `params>K` | layers with fewer / more than K weights |
| anything else | a glob on the module name (fnmatch, case-sensitive): `layer4.*`, `classifier.?` |

A module literally named like a selector is reached with a glob: `[c]onv`.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from typing import Callable

from ..errors import RecipeError
from ..ir import Graph, Op, is_depthwise

KINDS: dict[str, Callable[[Op], bool]] = {
    "conv": lambda op: op.kind == "conv",
    "linear": lambda op: op.kind == "linear",
    "depthwise": is_depthwise,
    "grouped": lambda op: op.kind == "conv" and op.attrs.get("groups", 1) > 1,
}
_POSITION = re.compile(r"(first|last|early|late):(.*)")
_SIZE = re.compile(r"params([<>])(.*)")


@dataclass(frozen=True)
class Layer:
    """What a selector reads about one weighted layer: its place and its share of the weights."""

    op: Op
    index: int  # in graph order, from 0
    count: int  # weighted layers in the graph
    before: int  # weights of the layers before it
    total: int  # weights of all layers

    @property
    def through(self) -> int:
        return self.before + self.op.weight.size


Rule = Callable[[Layer], bool]


def is_structural(pattern: str) -> bool:
    """Whether `pattern` is a selector by structure (else it is a name glob)."""
    return (pattern in ("first", "last") or pattern in KINDS
            or bool(_POSITION.fullmatch(pattern) or _SIZE.fullmatch(pattern)))


def rule(pattern: str) -> Rule:
    """The test a selector applies to each layer; a malformed structural selector is a RecipeError."""
    if pattern == "first":
        return lambda l: l.index == 0
    if pattern == "last":
        return lambda l: l.index == l.count - 1
    if pattern in KINDS:
        kind = KINDS[pattern]
        return lambda l: kind(l.op)
    pos = _POSITION.fullmatch(pattern)
    if pos:
        where, arg = pos.groups()
        if where == "first":
            k = _count(pattern, arg)
            return lambda l: l.index < k
        if where == "last":
            k = _count(pattern, arg)
            return lambda l: l.index >= l.count - k
        f = _fraction(pattern, arg)
        if where == "early":
            return lambda l: l.through <= f * l.total
        return lambda l: l.total - l.before <= f * l.total
    size = _SIZE.fullmatch(pattern)
    if size:
        cmp, arg = size.groups()
        k = _number(pattern, arg)
        return (lambda l: l.op.weight.size < k) if cmp == "<" else (lambda l: l.op.weight.size > k)
    return lambda l: fnmatch.fnmatchcase(l.op.name, pattern)


def _count(pattern: str, arg: str) -> int:
    if not (arg.isascii() and arg.isdigit()) or int(arg) < 1:
        raise RecipeError(f"layer selector '{pattern}' needs a whole number of layers ≥ 1, e.g. "
                          f"'{pattern.split(':')[0]}:3'")
    return int(arg)


def _fraction(pattern: str, arg: str) -> float:
    try:
        f = float(arg)
    except ValueError:
        f = math.nan
    if not 0 < f <= 1:
        raise RecipeError(f"layer selector '{pattern}' needs a fraction F of the weights with 0 < F ≤ 1, e.g. "
                          f"'{pattern.split(':')[0]}:0.1'")
    return f


def _number(pattern: str, arg: str) -> float:
    try:
        k = float(arg)
    except ValueError:
        k = math.nan
    if not (math.isfinite(k) and k >= 0):
        raise RecipeError(f"layer selector '{pattern}' needs a number of weights K ≥ 0, e.g. 'params<10000'")
    return k


def check_selector(pattern: str) -> None:
    """Refuse a malformed structural selector when the recipe is read, not when it is applied."""
    rule(pattern)


def select(graph: Graph, patterns: list[str]) -> dict[str, list[str]]:
    """For each pattern, the names of the weighted layers it selects, in graph order."""
    ops = graph.weighted_ops()
    total = sum(op.weight.size for op in ops)
    layers, before = [], 0
    for i, op in enumerate(ops):
        layers.append(Layer(op, i, len(ops), before, total))
        before += op.weight.size
    out: dict[str, list[str]] = {}
    for pattern in patterns:
        test = rule(pattern)
        out[pattern] = [l.op.name for l in layers if test(l)]
    return out


def override_matches(graph: Graph, overrides: list[dict]) -> list[list[str]]:
    """For each [[overrides]] entry, the weighted layers its selectors select together, in graph order."""
    order = [op.name for op in graph.weighted_ops()]
    out = []
    for o in overrides:
        chosen = {name for names in select(graph, o["layers"]).values() for name in names}
        out.append([name for name in order if name in chosen])
    return out
