"""The registry of weight methods. Every method has one entry signature,

    quantize(graph, stats, recipe) -> LayerWeights (op name -> WeightQuant)

returns integer weights only, and never touches the manifest, the simulator or an exporter. It
declares its recipe sections here; `ptq.recipe` builds the schema from them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .fields import Field


@dataclass(frozen=True)
class Method:
    """A registered method: its entry point, the recipe sections it owns, and the keys it reads per
    layer, which `[[overrides]]` may set ('section.key': of its own sections or a base one such as
    weights.bits; `ptq.recipe` refuses other methods' keys, which this method would ignore)."""

    name: str
    quantize: Callable
    sections: dict[str, dict[str, Field]] = field(default_factory=dict)
    override_keys: tuple[str, ...] = ()
    # whether it reads the Fisher sensitivity under a resolved recipe: calibration ranks then measure
    # it with the statistics (one process measures it on first use whatever this says)
    reads_fisher: Callable[[dict], bool] = lambda recipe: False
    # whether it reads the layer input moments (`stats.layer_inputs`) under a resolved recipe: a recipe
    # that sets calibration.layer_moments = false is refused where it does
    reads_moments: Callable[[dict], bool] = lambda recipe: True


METHODS: dict[str, Method] = {}

ENGINE_KEYS = ("weights.rounding",)  # per-layer keys every method accepts: the rounding engine reads them


def register(name: str, sections: dict[str, dict[str, Field]] | None = None, override_keys: tuple[str, ...] = (),
             reads_fisher: bool | Callable[[dict], bool] = False,
             reads_moments: bool | Callable[[dict], bool] = True) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as method `name` with its recipe sections; `reads_fisher` and
    `reads_moments` say whether it reads `stats.fisher` and `stats.layer_inputs` (always, or under
    the recipe given)."""
    def deco(fn: Callable) -> Callable:
        for key in override_keys:  # keys of base sections are checked against the schema by ptq.recipe
            section, _, k = key.partition(".")
            if section in (sections or {}) and k not in sections[section]:
                raise KeyError(f"method {name}: override key {key} is not one of its recipe keys")
        METHODS[name] = Method(name, fn, dict(sections or {}), tuple(override_keys) + ENGINE_KEYS,
                               _as_predicate(reads_fisher), _as_predicate(reads_moments))
        return fn
    return deco


def _as_predicate(reads: bool | Callable[[dict], bool]) -> Callable[[dict], bool]:
    return reads if callable(reads) else (lambda recipe: bool(reads))
