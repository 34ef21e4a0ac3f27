"""A GGUF budget's two sensitivities on smollm2-135m (or --model): measured KL (each weight quantized
alone, on --kl-tokens calibration tokens) against the imatrix-weighted error (llama.cpp's estimate, on the
same tokens and on the default 2,048). Prints the Spearman rank correlation of the cost tables and the plans
each gives under the same budget; every plan is then quantized alike (algorithm imatrix, 2,048 calibration
tokens in windows of 512) and saved for `lighten eval`. Costs and plans: OUT/costs.json.

    .venv/bin/python benchmarks/budget_sensitivity.py [--bits 4.5] [--kl-tokens 256] [-o out/budget]
    lighten eval out/budget/kl       # and the other plans' folders
"""

import argparse
import copy
import json
import time
from collections import Counter
from pathlib import Path

import scipy.stats

from lighten.algorithms.allocate import (
    allocate_ilp,
    allocation_table,
    candidate_sizes,
    total_cost,
    total_size,
)
from lighten.algorithms.calibrate import calibrate_model
from lighten.algorithms.sensitivity import imatrix_sensitivity, input_importance, layer_sensitivity
from lighten.checkpoint import save_checkpoint
from lighten.eval import wiki_texts
from lighten.models import load_model, resolve
from lighten.plan import budget_candidates
from lighten.recipes import parse_budget, parse_recipe

LOW_BIT = ("q3_k", "q2_k")  # offered to one extra imatrix plan: does the ILP want them at this budget?


def main(args):
    model, tok = load_model(args.model)
    texts = wiki_texts("calibration")
    recipe = parse_recipe({"format": "q4_k", "budget": {"size": f"{args.bits}bits"}})
    candidates = budget_candidates(model, recipe)
    with_low = {n: specs + [t for t in LOW_BIT if "q4_k" in specs] for n, specs in candidates.items()}
    names = list(candidates)
    few = input_importance(model, tok, texts, names, args.kl_tokens, args.kl_tokens)
    default = input_importance(model, tok, texts, names, 2048, 512)
    start = time.perf_counter()
    costs = {}
    for name, measure in (
        ("kl", lambda: layer_sensitivity(model, tok, texts, candidates, args.kl_tokens, args.kl_tokens, few)),
        ("imatrix", lambda: imatrix_sensitivity(model, candidates, few, few)),
        ("imatrix-2048", lambda: imatrix_sensitivity(model, with_low, default, default)),
    ):
        costs[name] = measure()
        print(f"{name} costs: {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
    keys = [(n, s) for n, specs in candidates.items() for s in specs]
    for name in ("imatrix", "imatrix-2048"):
        rho = scipy.stats.spearmanr([costs["kl"][k] for k in keys], [costs[name][k] for k in keys]).statistic
        print(f"Spearman(kl, {name}) over {len(keys)} (weight, type) costs: {rho:.4f}")
    sizes = candidate_sizes(model, with_low)
    limit = parse_budget(recipe.budget.size, sum(model.get_parameter(n).numel() for n in names))
    default_only = {k: v for k, v in costs["imatrix-2048"].items() if k in sizes and k in set(keys)}
    plans = {
        "kl": (costs["kl"], {k: sizes[k] for k in keys}),
        "imatrix": (costs["imatrix"], {k: sizes[k] for k in keys}),
        "imatrix-2048": (default_only, {k: sizes[k] for k in keys}),
        "imatrix-2048-low": (costs["imatrix-2048"], sizes),
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    record = {"costs": {name: [[*k, c] for k, c in table.items()] for name, table in costs.items()}}
    for name, (table, table_sizes) in plans.items():
        plan = allocate_ilp(table, table_sizes, limit)
        bits = 8 * total_size(plan, sizes) / sum(model.get_parameter(n).numel() for n in plan)
        kl_objective = total_cost(plan, costs["kl"]) if all(k in costs["kl"] for k in plan.items()) else None
        print(f"{name}: {bits:.4f} bits, KL objective {kl_objective}, types {dict(Counter(plan.values()))}")
        record[name] = plan
        quantized_model = copy.deepcopy(model)
        quantized = calibrate_model(quantized_model, tok, texts, plan, "imatrix", 2048, 512)
        save_checkpoint(
            quantized_model,
            quantized,
            resolve(args.model),
            args.model,
            out / name,
            force=True,
            allocation=allocation_table(plan, table, sizes),
        )
        del quantized_model, quantized
    (out / "costs.json").write_text(json.dumps(record))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--bits", type=float, default=4.5)
    parser.add_argument("--kl-tokens", type=int, default=256)
    parser.add_argument("-o", "--output", default="out/budget")
    main(parser.parse_args())
