"""Weight methods: each turns (graph, calibration statistics, recipe) into integer weights.

The package imports its built-in methods, which register themselves with `registry.register`.
"""
from __future__ import annotations

from .registry import METHODS, Method, register
from . import uniform, multipoint, accumulator, swis, bitplane  # noqa: E402,F401  (the built-in methods)

__all__ = ["METHODS", "Method", "register"]
