"""Mixed precision under a memory budget: one format per weight, minimising the summed sensitivity.

This is the multiple-choice knapsack that HAWQ-V3 and LQ-LoRA solve as an integer linear program:

    minimise    sum_ij cost[i, j] * x[i, j]
    subject to  sum_j x[i, j] = 1                    (every weight i gets exactly one format j)
                sum_ij size[i, j] * x[i, j] <= budget
                x[i, j] in {0, 1}

Sizes are the exact stored bytes (codes, scales, zero-points) from Format.layout, not bits_per_element:
short last groups and per-channel scales cost real bytes, and a budget is a promise about the file.
"""

import math

import numpy as np
from torch import nn

from lighten import formats
from lighten.errors import LightenError
from lighten.quantize import weight_shape


def candidate_sizes(model: nn.Module, candidates: dict[str, list[str]]) -> dict[tuple[str, str], int]:
    """{(weight name, spec): exact stored bytes}, from the format's buffer layout (nothing is quantized)."""
    sizes = {}
    for name, specs in candidates.items():
        shape = weight_shape(model, name)
        for spec in specs:
            layout = formats.get(spec).layout(shape)
            sizes[name, spec] = sum(dtype.itemsize * math.prod(s) for dtype, s in layout.values())
    return sizes


def allocate_ilp(
    costs: dict[tuple[str, str], float], sizes: dict[tuple[str, str], int], budget_bytes: int
) -> dict[str, str]:
    """{weight name: spec} with the least total cost whose total size fits `budget_bytes`, solved exactly
    by branch and bound (scipy's HiGHS)."""
    # Imported here: scipy.optimize adds ~40 MB to the RSS of every process that imports it.
    from scipy.optimize import Bounds, LinearConstraint, milp

    options = _options(sizes, budget_bytes)
    keys = [(name, spec) for name, specs in options.items() for spec in specs]
    cost = np.array([costs[k] for k in keys], dtype=float)
    # HiGHS stops within an absolute gap of 1e-6 that scipy does not expose; scaling the costs up makes
    # that gap negligible. Subtracting each weight's cheapest cost is a constant and keeps numbers small.
    floor = {name: min(costs[name, s] for s in specs) for name, specs in options.items()}
    spread = max(costs[k] - floor[k[0]] for k in keys)
    objective = cost - [floor[name] for name, _ in keys]
    if spread > 0:  # divided first: 1e6 / spread overflows for a subnormal spread (hypothesis found 2e-308)
        objective = objective / spread * 1e6
    one_each = np.array([[k[0] == name for k in keys] for name in options], dtype=float)
    knapsack = np.array([[sizes[k] for k in keys]], dtype=float)
    result = milp(
        objective,
        constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(knapsack, -np.inf, budget_bytes)],
        integrality=np.ones(len(keys)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0},
    )
    if result.x is None:  # feasibility was checked above, so this is the solver's failure, not the user's
        raise RuntimeError(f"the allocation ILP failed: {result.message}")
    plan = {name: spec for (name, spec), x in zip(keys, result.x, strict=True) if x > 0.5}
    if total_size(plan, sizes) > budget_bytes:  # HiGHS rounds within 1e-6; never hand back an overshoot
        raise RuntimeError(
            f"the allocation ILP overshot the budget by {total_size(plan, sizes) - budget_bytes} bytes"
        )
    return plan


def allocate_greedy(
    costs: dict[tuple[str, str], float], sizes: dict[tuple[str, str], int], budget_bytes: int
) -> dict[str, str]:
    """The baseline the ILP is judged against: start from every weight's smallest format, then keep making
    the change with the largest cost reduction per extra byte that still fits."""
    options = _options(sizes, budget_bytes)
    plan = {
        name: min(specs, key=lambda s, n=name: (sizes[n, s], costs[n, s])) for name, specs in options.items()
    }
    free = budget_bytes - sum(sizes[name, spec] for name, spec in plan.items())
    while True:
        moves = []
        for name, specs in options.items():
            now = plan[name]
            for spec in specs:
                gain, extra = costs[name, now] - costs[name, spec], sizes[name, spec] - sizes[name, now]
                if gain > 0 and extra <= free:  # a move that also saves bytes is free: it goes first
                    moves.append((gain / extra if extra > 0 else math.inf, name, spec))
        if not moves:
            return plan
        _, name, spec = max(moves)
        free -= sizes[name, spec] - sizes[name, plan[name]]
        plan[name] = spec


def total_cost(plan: dict[str, str], costs: dict[tuple[str, str], float]) -> float:
    return sum(costs[name, spec] for name, spec in plan.items())


def total_size(plan: dict[str, str], sizes: dict[tuple[str, str], int]) -> int:
    return sum(sizes[name, spec] for name, spec in plan.items())


def allocation_table(
    plan: dict[str, str], costs: dict[tuple[str, str], float], sizes: dict[tuple[str, str], int]
) -> list[dict]:
    """One row per weight, in plan order: name, format, bytes, sensitivity (for the CLI to print)."""
    return [
        {"name": name, "format": spec, "bytes": sizes[name, spec], "sensitivity": costs[name, spec]}
        for name, spec in plan.items()
    ]


def _options(sizes: dict[tuple[str, str], int], budget_bytes: int) -> dict[str, list[str]]:
    """{weight name: candidate specs}; LightenError with the achievable range if nothing fits."""
    options: dict[str, list[str]] = {}
    for name, spec in sizes:
        options.setdefault(name, []).append(spec)
    smallest = sum(min(sizes[n, s] for s in specs) for n, specs in options.items())
    largest = sum(max(sizes[n, s] for s in specs) for n, specs in options.items())
    if budget_bytes < smallest:
        raise LightenError(
            f"a budget of {_bytes(budget_bytes)} cannot be met: these candidates give between "
            f"{_bytes(smallest)} (every weight at its smallest format) and {_bytes(largest)} (largest); "
            "raise the budget or add a smaller candidate format"
        )
    return options


def _bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"
