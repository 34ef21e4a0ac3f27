"""RTN vs MSE-clip vs AWQ vs GPTQ, and uniform vs ILP vs greedy allocation at equal bytes. Quality first;
GPTQ's wall time and peak RSS on 2 cores are printed too. Calibration uses the calibration split only.

    .venv/bin/python benchmarks/calibration.py [--tokens 4096] [--calibration-tokens 4096] [--formats ...]
    .venv/bin/python benchmarks/calibration.py --models      # the allocation table alone (~15 min)
"""

import argparse
import copy
import resource
import time

from lighten.algorithms.allocate import (
    allocate_greedy,
    allocate_ilp,
    candidate_sizes,
    total_cost,
    total_size,
)
from lighten.algorithms.calibrate import calibrate_model
from lighten.algorithms.sensitivity import layer_sensitivity
from lighten.eval import causal_fidelity, embedding_fidelity, eval_sentences, wiki_texts
from lighten.models import load_model
from lighten.plan import make_plan
from lighten.recipes import parse_budget

FORMATS = ("int4:g128", "int3:g128", "int2:g64")
ALGORITHMS = ("rtn", "mse", "awq", "gptq")  # the README table's column order


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantized(ref, tok, spec, algorithm, calib, tokens):
    """A copy of `ref` whose planned weights hold their dequantized values after `algorithm`."""
    model = copy.deepcopy(ref)
    start = time.perf_counter()
    calibrate_model(model, tok, calib, make_plan(model, spec), algorithm, n_tokens=tokens, context=512)
    return model, time.perf_counter() - start


def algorithms_table(name, args, calib):
    ref, tok = load_model(name)
    causal = name != "minilm"
    measure = f"perplexity / KL on {args.tokens} held-out tokens" if causal else "embedding cosine / Spearman"
    print(f"\n{name} (real): {measure}")
    for spec in args.formats:
        models, seconds = [], []
        for algorithm in ALGORITHMS:
            m, s = quantized(ref, tok, spec, algorithm, calib, args.calibration_tokens)
            models.append(m)
            seconds.append(s)
        if causal:
            fid = causal_fidelity(
                ref, models, tok, wiki_texts("evaluation"), n_tokens=args.tokens, context=512
            )
            base = fid["reference"]["perplexity"]
            cells = [f"ppl {c['perplexity']:8.3f} KL {c['kl']:.4f}" for c in fid["candidates"]]
        else:
            fid = embedding_fidelity(ref, models, tok, eval_sentences())
            base = None
            cells = [f"cos {c['cosine']:.4f} ρ {c['spearman']:.4f}" for c in fid["candidates"]]
        for algorithm, cell, s in zip(ALGORITHMS, cells, seconds, strict=True):
            print(f"  {spec:10s} {algorithm:5s} {cell}   ({s:6.1f} s)", flush=True)
        if base:
            print(f"  fp32 ppl {base:.3f}")
    print(f"  peak RSS so far {peak_rss_mb():.0f} MB")


def allocation_table(args, calib):
    ref, tok = load_model("smollm2-135m")
    candidates = {n: ["int3:g128", "int4:g128", "int8:channel"] for n in make_plan(ref, "int4:g128")}
    costs = layer_sensitivity(ref, tok, calib, candidates, n_tokens=args.sensitivity_tokens, context=256)
    sizes = candidate_sizes(ref, candidates)
    n = sum(ref.get_parameter(k).numel() for k in candidates)
    print("\nsmollm2-135m (real): allocation at equal bytes (objective = summed per-weight KL), all RTN")
    # int3:g32 and int4:g32 cost exactly 3.5 and 4.5 bits here (every row is a multiple of 32 long): the
    # uniform formats at the budgets' bytes.
    uniform = {
        f"uniform {spec}": {k: spec for k in candidates}
        for spec in ("int3:g128", "int3:g32", "int4:g128", "int4:g32")
    }
    plans = dict(uniform)
    for bits in ("3.5bits", "4.5bits"):
        budget = parse_budget(bits, n)
        plans[f"{bits} ilp"] = allocate_ilp(costs, sizes, budget)
        plans[f"{bits} greedy"] = allocate_greedy(costs, sizes, budget)
    models = []
    for plan in plans.values():
        m = copy.deepcopy(ref)
        calibrate_model(m, tok, calib, plan, "rtn")
        models.append(m)
    fid = causal_fidelity(ref, models, tok, wiki_texts("evaluation"), n_tokens=args.tokens, context=512)
    every_size = sizes | candidate_sizes(ref, {k: [p[k] for p in uniform.values()] for k in candidates})
    for (how, plan), c in zip(plans.items(), fid["candidates"], strict=True):
        avg = 8 * total_size(plan, every_size) / n
        # The g32 formats are not candidates, so they were not probed and have no objective.
        objective = f"{total_cost(plan, costs):.4f}" if all(k in costs for k in plan.items()) else "-"
        print(
            f"  {how:18s} objective {objective:>6s}  {avg:.3f} bits  "
            f"ppl {c['perplexity']:.3f}  KL {c['kl']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calibration-tokens", type=int, default=4096)
    parser.add_argument("--sensitivity-tokens", type=int, default=256)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS))
    models = ["smollm2-135m", "minilm"]
    parser.add_argument("--models", nargs="*", default=models, help="none: the allocation table alone")
    parser.add_argument("--no-allocation", action="store_true")
    args = parser.parse_args()
    calib = wiki_texts("calibration")
    for name in args.models:
        algorithms_table(name, args, calib)
    if not args.no_allocation:
        allocation_table(args, calib)
