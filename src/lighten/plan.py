"""Which weights to quantize, to which format: a plan {weight name (as in model.state_dict()): canonical
spec}, from a recipe's rules or, under a budget, from measured sensitivity and the allocation ILP.

Only weights that feed matrix multiplies are candidates: Linear layers, GPT-2's Conv1D and, on request,
embedding tables. Norms and biases always stay in full precision; lm_head does unless a rule names it,
because the logits are the most sensitive matmul in a language model (and in tied models it *is* the
embedding).

GGUF block types store rows of whole blocks (32 or 256 weights): a weight whose rows are not takes
llama-quantize's fallback type when the recipe allows it (`fallback`), and is refused otherwise.

A GGUF budget (the recipe's format is a GGUF type) is llama.cpp's: its bits per weight average over the
matrices inside the transformer blocks (blk.*), which choose among GGUF_CANDIDATES where the recipe lists
none. The token embedding and output matrix are outside it: lighten keeps them unless asked, and the GGUF
export writes them as Q8_0 by default, what llama-quantize gives SmolLM2's; planned ones (`embeddings`, a
rule naming lm_head) get OUTSIDE_BLOCKS, or their rule's type, and are not counted either.
"""

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten import formats
from lighten.algorithms.allocate import allocate_ilp, allocation_table, candidate_sizes, total_size
from lighten.algorithms.sensitivity import imatrix_sensitivity, input_importance, layer_sensitivity
from lighten.errors import LightenError
from lighten.formats.ggml import GGMLFormat
from lighten.models.arch import model_view
from lighten.progress import note
from lighten.quantize import weight_shape
from lighten.recipes import KEEP, Recipe, budget_bits, parse_budget, recipe_from_options

DEFAULT_SKIP = ("lm_head",)
# KL probes run every (weight, candidate) pair on their tokens: at most this many of the calibration's.
PROBE_TOKENS = 512
# A GGUF budget's candidates when the recipe lists none: llama.cpp's 4- to 8-bit types, each weight keeping
# those that fit its rows (the k-quants and iq4_xs need rows of whole 256-blocks), plus the recipe's format.
GGUF_CANDIDATES = ("q4_0", "iq4_nl", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "iq4_xs")
# (type, budget in bits below which it joins them): under 4.5 bits the 4-bit types (4.25-4.5) cannot all
# be afforded, and llama.cpp's own mixes there (Q3_K_S/M/L) are mostly q3_k; under 3.5 bits neither can
# q3_k (3.44), and its Q2_K mix is mostly q2_k. Above that they are the ILP's riskiest choices, as costs
# rated one weight at a time stop adding up at 2-3 bits: offered at 4.5 bits on smollm2-135m, the imatrix
# estimate put 12 down_proj at q3_k/q2_k and the plan's KL rose from 0.112 to 0.163 (README, Calibration).
LOW_BIT_TYPES = (("q3_k", 4.5), ("q2_k", 3.5))
OUTSIDE_BLOCKS = "q8_0"  # a GGUF budget's planned weights outside the blocks, as llama.cpp's default


def make_plan(model: nn.Module, spec: str, embeddings: bool = False) -> dict[str, str]:
    """One format for every Linear/Conv1D weight but lm_head (and every embedding, if asked): the plan of
    a recipe that gives only a format."""
    return plan_from_recipe(model, recipe_from_options(spec, embeddings=embeddings))


def plan_from_recipe(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """{weight name: spec} from the rules (first match wins) and the default format, GGUF types fitted to
    their weights' rows (fit_rows). A budget is not applied here: `budget_plan` chooses among its candidates
    for the weights no rule fixes."""
    plan = fit_rows(model, _rule_plan(model, recipe), recipe.fallback)
    if not plan:
        raise LightenError(
            f"no weight of recipe {recipe.name!r} fits a GGUF type it names: nothing to quantize"
        )
    return plan


def _rule_plan(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    n_blocks = model.config.num_hidden_layers
    plan = {}
    for name in matmul_weights(model, recipe.embeddings):
        rule = recipe.rule_for(name, n_blocks)
        if rule is None and any(re.search(p, name) for p in DEFAULT_SKIP):
            continue
        spec = rule.format if rule else recipe.format
        if spec != KEEP:
            plan[name] = spec
    if not plan:
        raise LightenError(
            f"recipe {recipe.name!r} keeps every weight in full precision: nothing to quantize"
        )
    return plan


def matmul_weights(model: nn.Module, embeddings: bool) -> list[str]:
    """Names of the Linear/Conv1D weights (and embedding tables, if asked). A weight tied to an embedding
    follows the `embeddings` flag; tied weights appear once."""
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    names, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            continue
        ptr = module.weight.data_ptr()
        if (ptr in embedding_ptrs and not embeddings) or ptr in seen:
            continue
        seen.add(ptr)
        names.append(f"{name}.weight")
    return names


def fits(spec: str, shape: tuple[int, ...]) -> bool:
    """Whether `spec` stores an [out, in] weight of `shape`: a GGUF type needs rows of whole blocks, every
    other format takes any row."""
    fmt = formats.get(spec)
    return not isinstance(fmt, GGMLFormat) or fmt.fallback_for(shape) == fmt


def fit_rows(model: nn.Module, plan: dict[str, str], fallback: bool) -> dict[str, str]:
    """`plan` with every weight in a type that fits its rows. With `fallback` a weight whose rows are not
    whole blocks of its GGUF type takes llama-quantize's type for it (GGMLFormat.fallback_for) and, where
    none fits, stays in full precision (llama-quantize writes F16), with a note; without, a LightenError
    saying so."""
    misfits = [name for name, spec in plan.items() if not fits(spec, weight_shape(model, name))]
    if misfits and not fallback:
        name = misfits[0]
        fmt, shape = formats.get(plan[name]), weight_shape(model, name)
        instead = fmt.fallback_for(shape)
        raise LightenError(
            f"{fmt.name} stores rows in whole blocks of {fmt.block_size}, which the rows of {len(misfits)} "
            f"of the {len(plan)} weights to quantize are not ({name}: {shape[-1]} wide): give --fallback "
            "(recipe: fallback: true) to store such weights as llama-quantize does (this one "
            f"{'as ' + instead.name if instead else 'in full precision'}), or choose a type that fits"
        )
    fitted = dict(plan)
    for name in misfits:
        instead = formats.get(plan[name]).fallback_for(weight_shape(model, name))
        if instead is None:
            del fitted[name]
        else:
            fitted[name] = instead.name
    _note_kept(set(plan) - set(fitted), "no GGUF type of its family fits its rows")
    return fitted


def block_weights(model: nn.Module) -> set[str]:
    """Names of the Linear / Conv1D weights inside the transformer blocks (llama.cpp's blk.* matrices)."""
    return {
        f"{name}.weight"
        for b in model_view(model).blocks
        for name in (*b.attn.linears, b.attn_out[0], *b.mlp.linears, b.mlp_out[0])
    }


def counted_weights(model: nn.Module, recipe: Recipe, names) -> list[str]:
    """Those of `names` a budget counts: in a GGUF budget the ones inside the blocks, as llama.cpp's bits per
    weight count, else all."""
    if not recipe.gguf:
        return list(names)
    inside = block_weights(model)
    return [name for name in names if name in inside]


def budget_choices(recipe: Recipe, bits: float) -> list[str]:
    """The specs a budget of `bits` per counted weight chooses among: the recipe's candidates or, for a GGUF
    budget without any, GGUF_CANDIDATES, the low-bit k-quants it is low enough for, and the format."""
    if recipe.budget.candidates:
        return list(recipe.budget.candidates)
    low = [name for name, below in LOW_BIT_TYPES if bits < below]
    return list(dict.fromkeys([*GGUF_CANDIDATES, *low, recipe.format]))


def budget_candidates(model: nn.Module, recipe: Recipe) -> dict[str, list[str]]:
    """{weight name: specs to choose from} under the recipe's budget, each fitting the weight's rows: one
    spec for a weight a rule fixes (fitted as fit_rows does) or, in a GGUF budget, one outside the blocks
    (OUTSIDE_BLOCKS unless a rule names it); the budget's choices (budget_choices) that fit, for the rest.
    A weight that none fits stays in full precision with `fallback`, and is a LightenError otherwise."""
    n_blocks = model.config.num_hidden_layers
    planned = _rule_plan(model, recipe)
    counted = set(counted_weights(model, recipe, planned))
    if not counted:
        raise LightenError(
            "a GGUF budget counts the matrices inside the blocks, and this recipe keeps them all"
        )
    bits = budget_bits(recipe.budget.size, sum(model.get_parameter(n).numel() for n in counted))
    choices = budget_choices(recipe, bits)
    ruled = {name for name in planned if recipe.rule_for(name, n_blocks)}
    one_spec = {
        name: spec if name in ruled else OUTSIDE_BLOCKS
        for name, spec in planned.items()
        if name in ruled or name not in counted
    }
    fitted = fit_rows(model, one_spec, recipe.fallback)
    candidates, unfit = {}, []
    for name in planned:
        if name in fitted:
            candidates[name] = [fitted[name]]
        elif name in one_spec:
            continue  # fit_rows keeps it in full precision
        elif fitting := [c for c in choices if fits(c, weight_shape(model, name))]:
            candidates[name] = fitting
        else:
            unfit.append(name)
    if unfit and not recipe.fallback:
        width = weight_shape(model, unfit[0])[-1]
        more = f" and {len(unfit) - 1} more weights" if len(unfit) > 1 else ""
        raise LightenError(
            f"no budget candidate fits the rows of {unfit[0]} ({width} wide){more}: add a candidate that "
            "does, keep them with --skip, or give --fallback to keep such weights in full precision"
        )
    _note_kept(unfit, "no budget candidate fits its rows")
    if not counted & set(candidates):
        raise LightenError(f"recipe {recipe.name!r} leaves the budget no weight to choose a format for")
    return candidates


def _note_kept(names, why: str) -> None:
    if names:
        names = sorted(names)
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        note(f"fallback: {names[0]}{more} kept in full precision ({why})")


def budget_plan(
    model: nn.Module, tokenizer, recipe: Recipe, texts: list[str]
) -> tuple[dict[str, str], list[dict], dict]:
    """(plan, allocation table, budget summary) for a recipe with a budget: measure each counted weight's
    sensitivity to each of its candidates on the calibration text (recipe.budget.sensitivity), then solve
    the allocation ILP under the budget. The table has a row per planned weight, with its candidates; the
    summary says what the budget counted and the bytes and bits per weight it achieved."""
    if recipe.budget is None:
        raise LightenError(f"recipe {recipe.name!r} has no budget: use plan_from_recipe")
    candidates = budget_candidates(model, recipe)
    counted = counted_weights(model, recipe, candidates)
    costs = _sensitivity(model, tokenizer, texts, recipe, candidates)
    sizes = candidate_sizes(model, candidates)
    n_weights = sum(model.get_parameter(name).numel() for name in counted)
    limit = parse_budget(recipe.budget.size, n_weights)
    chosen = allocate_ilp(
        {k: c for k, c in costs.items() if k[0] in counted},
        {k: s for k, s in sizes.items() if k[0] in counted},
        limit,
    )
    plan = {name: chosen.get(name, specs[0]) for name, specs in candidates.items()}
    table = allocation_table(plan, costs, sizes)
    for row in table:
        row["candidates"] = candidates[row["name"]]
    used = total_size(chosen, sizes)
    summary = {
        "size": recipe.budget.size,
        "counts": "block matrices" if recipe.gguf else "quantized weights",
        "weights": n_weights,
        "bytes_allowed": limit,
        "bytes": used,
        "bits_per_weight": 8 * used / n_weights,
        "sensitivity": recipe.budget.sensitivity,
        "not_counted": {name: spec for name, spec in plan.items() if name not in chosen},
    }
    return plan, table, summary


def _sensitivity(model, tokenizer, texts, recipe: Recipe, candidates: dict[str, list[str]]) -> dict:
    """{(weight name, spec): cost} for every candidate (0 where a weight has one: it changes no choice), by
    the recipe's sensitivity; GGUF types quantized with importance when the algorithm is imatrix."""
    probed = {name: specs for name, specs in candidates.items() if len(specs) > 1}
    costs = {(name, specs[0]): 0.0 for name, specs in candidates.items() if len(specs) == 1}
    if not probed:
        return costs
    tokens, context = recipe.calibration.tokens, recipe.calibration.context
    importance = None
    if recipe.budget.sensitivity == "imatrix" or recipe.algorithm == "imatrix":
        importance = input_importance(model, tokenizer, texts, list(probed), tokens, context)
    searched = importance if recipe.algorithm == "imatrix" else None
    if recipe.budget.sensitivity == "imatrix":
        return costs | imatrix_sensitivity(model, probed, importance, searched)
    probe_tokens = min(tokens, PROBE_TOKENS)
    return costs | layer_sensitivity(model, tokenizer, texts, probed, probe_tokens, context, searched)
