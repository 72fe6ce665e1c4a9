"""How a method declares its recipe settings (`Field`) and reads their per-layer values.

A method registers its sections with `ptq.methods.register(..., sections=...)`; `ptq.recipe`
assembles the full schema from the registry, so recipe parsing never reaches into a method module.
"""
from __future__ import annotations

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


def layer_setting(recipe: dict, key: str, layer: str, matches: list[list[str]]) -> Any:
    """A per-layer value: the last override that sets `key` and selects `layer` wins, else the
    recipe's section value. `matches`: what each override selects (`selectors.override_matches`)."""
    section, k = key.split(".")
    value = recipe[section][k]
    for o, chosen in zip(recipe["overrides"], matches):
        if key in o and layer in chosen:
            value = o[key]
    return value
