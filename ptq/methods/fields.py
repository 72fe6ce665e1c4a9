"""How a method declares its recipe settings (`Field`) and reads their per-layer values.

A method registers its sections with `ptq.methods.register(..., sections=...)`; `ptq.recipe`
assembles the full schema from the registry, so recipe parsing never reaches into a method module.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any

from ..errors import RecipeError


@dataclass(frozen=True)
class Field:
    """One recipe leaf: its default, type and allowed values or range."""

    default: Any
    kind: type | tuple[type, ...]
    choices: tuple | None = None
    lo: float | None = None
    hi: float | None = None
    help: str = ""

    def check(self, key: str, value: Any) -> Any:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "/".join(k.__name__ for k in kinds)
            raise RecipeError(f"recipe key '{key}' must be {names}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise RecipeError(f"recipe key '{key}' must be one of {', '.join(map(str, self.choices))}; got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"recipe key '{key}' must be a finite number; got {value!r}")
        if self.lo is not None and value < self.lo or self.hi is not None and value > self.hi:
            raise RecipeError(f"recipe key '{key}' must be between {self.lo:g} and {self.hi:g}; got {value!r}")
        return value


def layer_setting(recipe: dict, key: str, layer: str, first: str, last: str) -> Any:
    """A per-layer value: the last matching override wins, else the recipe's section value."""
    section, k = key.split(".")
    value = recipe[section][k]
    for o in recipe["overrides"]:
        if key in o and any(matches(pat, layer, first, last) for pat in o["layers"]):
            value = o[key]
    return value


def matches(pattern: str, layer: str, first: str, last: str) -> bool:
    if pattern == "first":
        return layer == first
    if pattern == "last":
        return layer == last
    return fnmatch.fnmatchcase(layer, pattern)


def unmatched_patterns(patterns: list[str], layers: list[str], first: str, last: str) -> list[str]:
    """The layer patterns of one [[overrides]] entry that select none of `layers` (a setting they
    carry would be ignored silently)."""
    return [p for p in patterns if not any(matches(p, layer, first, last) for layer in layers)]
