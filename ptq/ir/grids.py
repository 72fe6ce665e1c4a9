"""A weight scheme's grid: the integers each weight of a layer may take, as a projection.

Every step that decides or changes a layer's integers after a method chose its grid — the rounding
engine (nearest, error feedback, learned) and the builder's int32 bias fit — maps real values onto
the grid through `Grid.project`, so none of them can leave a weight its scheme cannot represent.
Values are in units of the term's per-channel scale; rows are output channels and columns the
reduction axis K of the (C, K) weight matrix, so a grid may depend on both (a SWIS group's shift set
does). It sits in the IR layer beside `WeightQuant`: the methods and the manifest both use it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .. import bitserial
from ..intmath import qmax, round_half_up
from .weights import WeightQuant

ROUNDINGS = ("nearest", "feedback", "learned")  # how the rounding engine puts weights on a grid (weights.rounding)


@dataclass
class Grid:
    """The narrow symmetric b-bit grid: round half up, clip to ±(2^(b−1) − 1). Also a bit-plane
    window (its integers are stored at the window's step on a b-bit grid) and a multipoint point."""

    bits: int

    def project(self, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Nearest grid integer for every real x (C, n); cols (C, n) are their column indices."""
        m = qmax(self.bits)
        return torch.clamp(round_half_up(x), -m, m)

    def neighbours(self, x: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up): the grid values just below and above every real x (C, n), down ≤ x < up,
        both the grid's end beyond it. `project` is always one of the two (the learned rounding's
        choice)."""
        m = qmax(self.bits)
        f = torch.floor(x)
        return torch.clamp(f, -m, m), torch.clamp(f + 1, -m, m)


@dataclass
class SwisGrid(Grid):
    """A SWIS layer with its groups' shift sets fixed: each weight goes to the nearest value its
    group's set represents (zero always is), by the tables the method decides sets with."""

    shifts: np.ndarray = None  # (C, ⌈K/G⌉) bitmasks
    group: int = 8

    def __post_init__(self):
        masks, which = np.unique(np.asarray(self.shifts, np.int64), return_inverse=True)
        self._tables = torch.from_numpy(bitserial.nearest_tables(masks, self.bits - 1)).double()
        self._which = torch.from_numpy(which.reshape(np.asarray(self.shifts).shape)).long()
        self._masks = masks

    def _sets(self, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Index of the shift set of every weight (its row's group of its column)."""
        rows = torch.arange(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1))).expand_as(cols)
        return self._which[rows, cols // self.group]

    def project(self, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        top = (1 << (self.bits - 1)) - 1
        cell = torch.clamp(torch.floor(2 * torch.clamp(x.abs(), 0, top)), 0, self._tables.shape[1] - 1).long()
        return torch.sign(x) * self._tables[self._sets(x, cols), cell]

    def neighbours(self, x: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) in the group's set: its largest value at or below x and smallest above."""
        half = 1 << (self.bits - 1)
        f = (torch.clamp(torch.floor(x), -half, half - 1) + half).long()
        down, up = self._neighbour_tables
        sets = self._sets(x, cols)
        return down[sets, f], up[sets, f]

    @cached_property
    def _neighbour_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Built on first use: only the learned rounding asks for neighbours."""
        down, up = bitserial.neighbour_tables(self._masks, self.bits - 1)
        return torch.from_numpy(down).double(), torch.from_numpy(up).double()


def term_grids(wq: WeightQuant) -> list[Grid]:
    """One grid per term of a layer's WeightQuant, by its scheme."""
    w = wq.scheme
    if w["scheme"] == "swis":
        return [SwisGrid(w["bits"], wq.extra["shifts"], w["group"])]
    if w["scheme"] == "multipoint":
        return [Grid(b) for b in w["point_bits"][:len(wq.terms)]]
    return [Grid(w["bits"])]


def settle(wq: WeightQuant) -> None:
    """Recount what a scheme records about its integers after they changed (a SWIS layer's bit-serial
    schedule, order and cycles); nothing for the other schemes."""
    w = wq.scheme
    if w["scheme"] != "swis":
        return
    q = wq.terms[0][0]
    summary, order = bitserial.layer_schedule(q, w["group"], w["lanes"], w["shared_bits"], w["bits"], w["out_positions"])
    w.update(summary)
    wq.extra["order"] = order.astype(wq.extra["order"].dtype)


def onto_grid(wq: WeightQuant, x: np.ndarray, rows: np.ndarray) -> None:
    """Replace term 0's integers on the marked rows (channels) with the grid's nearest values for the
    real values x (shaped like the weight, in units of term 0's scale), then `settle` the scheme."""
    q, s = wq.terms[0]
    c = q.shape[0]
    flat = torch.from_numpy(np.asarray(x, np.float64).reshape(c, -1))
    cols = torch.arange(flat.shape[1]).expand(c, -1)
    near = term_grids(wq)[0].project(flat, cols).numpy().astype(np.int64).reshape(q.shape)
    wq.terms[0] = (np.where(rows, near, q).astype(np.int64), s)
    settle(wq)


__all__ = ["ROUNDINGS", "Grid", "SwisGrid", "onto_grid", "settle", "term_grids"]
