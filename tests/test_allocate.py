"""The allocator's integer program: equal to brute force, shared input widths, clear budget errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from ptq.methods.allocator import Candidate, LayerChoices, solve_allocation as allocate
from ptq.errors import BudgetError


def instance(seed: int = 0) -> list[LayerChoices]:
    """Four layers; layers 1 and 2 read the same tensor 't', so they must agree on input bits."""
    rng = np.random.default_rng(seed)
    layers = []
    for li, tensor in enumerate(["x", "t", "t", "u"]):
        params, macs = int(rng.integers(50, 500)), int(rng.integers(1000, 9000))
        cands = []
        for wb in (2, 3, 4, 6, 8):
            for ab in (4, 6, 8):
                err = float(rng.uniform(0.5, 1.5) * (2.0 ** -wb + 0.5 * 2.0 ** -ab))
                cands.append(Candidate({"weight_bits": wb, "input_bits": ab}, err,
                                       {"weight_bits": params * wb, "bops": macs * wb * ab}, wb + ab + 6))
        layers.append(LayerChoices(f"l{li}", tensor, cands))
    return layers


def brute_force(layers, budgets, p):
    best, best_err = None, np.inf
    for combo in itertools.product(*[range(len(lc.candidates)) for lc in layers]):
        cs = [lc.candidates[j] for lc, j in zip(layers, combo)]
        if any(c.acc_bits > p for c in cs):
            continue
        if cs[1].knobs["input_bits"] != cs[2].knobs["input_bits"]:
            continue
        if any(sum(c.costs[k] for c in cs) > b for k, b in budgets.items()):
            continue
        err = sum(c.error for c in cs)
        if err < best_err:
            best, best_err = combo, err
    return best, best_err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_equals_brute_force(seed):
    layers = instance(seed)
    total_params = sum(lc.candidates[0].costs["weight_bits"] / 2 for lc in layers)
    budgets = {"weight_bits": 4.0 * total_params, "bops": 0.5 * sum(max(c.costs["bops"] for c in lc.candidates) for lc in layers)}
    combo, err = brute_force(layers, budgets, 20)
    a = allocate(layers, budgets, accumulator_bits=20)
    assert a.status == "optimal" and a.solver in ("HIGHS", "SCIPY")
    assert a.objective == pytest.approx(err, rel=1e-9)
    assert [a.choice[lc.layer] for lc in layers] == [lc.candidates[j] for lc, j in zip(layers, combo)]
    assert a.choice["l1"].knobs["input_bits"] == a.choice["l2"].knobs["input_bits"] == a.input_bits["t"]
    assert all(a.used[k] <= b for k, b in budgets.items())


def test_greedy_fallback_meets_the_budget_and_shares_widths():
    layers = instance(3)
    total_params = sum(lc.candidates[0].costs["weight_bits"] / 2 for lc in layers)
    budgets = {"weight_bits": 4.0 * total_params}
    g = allocate(layers, budgets, accumulator_bits=20, solver="greedy")
    m = allocate(layers, budgets, accumulator_bits=20)
    assert g.status == "greedy" and g.used["weight_bits"] <= budgets["weight_bits"]
    assert g.choice["l1"].knobs["input_bits"] == g.choice["l2"].knobs["input_bits"]
    assert m.objective <= g.objective + 1e-12


def test_accumulator_limit_excludes_candidates_and_pins_hold():
    layers = instance(4)
    layers[3].pinned = next(j for j, c in enumerate(layers[3].candidates) if c.knobs == {"weight_bits": 8, "input_bits": 8})
    a = allocate(layers, {}, accumulator_bits=16)
    assert all(c.acc_bits <= 16 for name, c in a.choice.items() if name != "l3")
    assert a.choice["l3"].knobs == {"weight_bits": 8, "input_bits": 8}


def test_infeasible_budget_names_the_constraint_and_the_least_budget():
    layers = instance(5)
    least = sum(min(c.costs["weight_bits"] for c in lc.candidates if c.acc_bits <= 18) for lc in layers)
    with pytest.raises(BudgetError, match=rf"budget weight_bits = 10 cannot be met: the least any choice needs is {least:g}"):
        allocate(layers, {"weight_bits": 10}, accumulator_bits=18)
    with pytest.raises(BudgetError, match="no candidate of layer l0 fits a 9-bit accumulator"):
        allocate(layers, {}, accumulator_bits=9)


def test_milp_solver_prints_nothing(capfd):
    """HiGHS writes a banner from C on file descriptor 1; it must reach neither stdout (--json) nor
    stderr (one-line messages)."""
    layers = instance(0)
    allocate(layers, {"weight_bits": 4.0 * sum(lc.candidates[0].costs["weight_bits"] / 2 for lc in layers)}, accumulator_bits=20)
    assert capfd.readouterr() == ("", "")
