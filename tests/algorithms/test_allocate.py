"""The allocation ILP against brute force, the greedy baseline, and budgets."""

import itertools
import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tiny_models import tiny_model

from lighten.algorithms.allocate import (
    allocate_greedy,
    allocate_ilp,
    allocation_table,
    candidate_sizes,
    total_cost,
    total_size,
)
from lighten.errors import LightenError
from lighten.plan import make_plan
from lighten.quantize import quantize_weights


@st.composite
def instances(draw):
    """2-5 weights x 2-4 options with random costs and sizes, and a budget somewhere in the feasible range."""
    costs, sizes = {}, {}
    for i in range(draw(st.integers(2, 5))):
        for j in range(draw(st.integers(2, 4))):
            costs[f"w{i}", f"f{j}"] = draw(st.floats(0, 1, allow_subnormal=False))
            sizes[f"w{i}", f"f{j}"] = draw(st.integers(1, 1000))
    smallest, largest = _range(sizes)
    return costs, sizes, draw(st.integers(smallest, largest))


def _range(sizes):
    names = {n for n, _ in sizes}
    per = [[sizes[k] for k in sizes if k[0] == n] for n in names]
    return sum(map(min, per)), sum(map(max, per))


def _brute_force(costs, sizes, budget):
    names = sorted({n for n, _ in sizes})
    options = [[s for n2, s in sizes if n2 == n] for n in names]
    plans = (dict(zip(names, choice, strict=True)) for choice in itertools.product(*options))
    return min(total_cost(p, costs) for p in plans if total_size(p, sizes) <= budget)


SUBNORMAL_SPREAD = (  # costs that differ by the smallest normal float: scaling them once overflowed
    {("w0", "f0"): 0.0, ("w0", "f1"): 0.0, ("w1", "f0"): 0.0, ("w1", "f1"): 2.2250738585072014e-308},
    {("w0", "f0"): 1, ("w0", "f1"): 1, ("w1", "f0"): 1, ("w1", "f1"): 1},
    2,
)


@settings(max_examples=300, deadline=None)
@given(instances())
@example(SUBNORMAL_SPREAD)
def test_ilp_is_optimal_and_beats_greedy(instance):
    costs, sizes, budget = instance
    ilp, greedy = allocate_ilp(costs, sizes, budget), allocate_greedy(costs, sizes, budget)
    for plan in (ilp, greedy):
        assert set(plan) == {n for n, _ in sizes}
        assert total_size(plan, sizes) <= budget
    assert math.isclose(total_cost(ilp, costs), _brute_force(costs, sizes, budget), abs_tol=1e-9)
    assert total_cost(ilp, costs) <= total_cost(greedy, costs) + 1e-9


def test_greedy_can_lose_to_the_ilp():
    """Best-ratio-first spends the budget on a cheap small win and cannot afford the big one."""
    costs = {("a", "lo"): 1.0, ("a", "hi"): 0.0, ("b", "lo"): 0.2, ("b", "hi"): 0.0}
    sizes = {("a", "lo"): 10, ("a", "hi"): 20, ("b", "lo"): 10, ("b", "hi"): 11}
    ilp, greedy = allocate_ilp(costs, sizes, 30), allocate_greedy(costs, sizes, 30)
    assert ilp == {"a": "hi", "b": "lo"} and total_cost(ilp, costs) == 0.2
    assert greedy == {"a": "lo", "b": "hi"} and total_cost(greedy, costs) == 1.0


def test_infeasible_budget_names_the_achievable_range():
    costs = {("a", "x"): 0.0, ("a", "y"): 1.0, ("b", "x"): 0.0, ("b", "y"): 1.0}
    sizes = {("a", "x"): 300, ("a", "y"): 100, ("b", "x"): 500, ("b", "y"): 200}
    for allocate in (allocate_ilp, allocate_greedy):
        with pytest.raises(LightenError, match=r"between 300 bytes .* and 800 bytes"):
            allocate(costs, sizes, 299)
    assert allocate_ilp(costs, sizes, 300) == {"a": "y", "b": "y"}
    assert allocate_ilp(costs, sizes, 10**9) == {"a": "x", "b": "x"}


def test_candidate_sizes_are_the_stored_bytes():
    """Per-channel scales and short last groups (g48 on 64- and 160-wide rows) cost real bytes."""
    model = tiny_model("gpt2")  # Conv1D: stored transposed
    specs = ["int8", "int3:g48", "nf4:dq", "int4:g32:asym"]
    sizes = candidate_sizes(model, {name: specs for name in make_plan(model, "int8")})
    for spec in specs:
        quantized = quantize_weights(model, make_plan(model, spec))
        assert all(sizes[name, spec] == q.nbytes for name, q in quantized.items())


def test_allocation_table_rows():
    costs = {("a", "x"): 0.5, ("a", "y"): 0.1}
    sizes = {("a", "x"): 10, ("a", "y"): 20}
    assert allocation_table({"a": "y"}, costs, sizes) == [
        {"name": "a", "format": "y", "bytes": 20, "sensitivity": 0.1}
    ]
