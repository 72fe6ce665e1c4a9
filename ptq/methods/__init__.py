"""Registry of weight methods. Every method has the same entry signature:

    quantize(graph, stats, recipe) -> dict[op name, WeightQuant]

and returns integer weights only; it never touches the simulator or the exporter.
"""
from __future__ import annotations

from typing import Callable

from .base import WeightQuant

METHODS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn: Callable) -> Callable:
        METHODS[name] = fn
        return fn
    return deco


from . import uniform  # noqa: E402,F401  (registers itself)
from . import multipoint  # noqa: E402,F401
from . import accumulator  # noqa: E402,F401
from . import swis  # noqa: E402,F401
from . import bitplane  # noqa: E402,F401

__all__ = ["METHODS", "WeightQuant", "register"]
