"""Which weights to quantize, to which format: a plan {weight name (as in model.state_dict()): canonical
spec}, from a recipe's rules or, under a budget, from measured sensitivity and the allocation ILP.

Only weights that feed matrix multiplies are candidates: Linear layers, GPT-2's Conv1D and, on request,
embedding tables. Norms and biases always stay in full precision; lm_head does unless a rule names it,
because the logits are the most sensitive matmul in a language model (and in tied models it *is* the
embedding).
"""

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten.algorithms.allocate import allocate_ilp, allocation_table, candidate_sizes
from lighten.algorithms.sensitivity import layer_sensitivity
from lighten.errors import LightenError
from lighten.recipes import KEEP, Recipe, parse_budget, recipe_from_options

DEFAULT_SKIP = ("lm_head",)
PROBE_TOKENS = 2048


def make_plan(model: nn.Module, spec: str, embeddings: bool = False) -> dict[str, str]:
    """One format for every Linear/Conv1D weight but lm_head (and every embedding, if asked): the plan of
    a recipe that gives only a format."""
    return plan_from_recipe(model, recipe_from_options(spec, embeddings=embeddings))


def plan_from_recipe(model: nn.Module, recipe: Recipe) -> dict[str, str]:
    """{weight name: spec} from the rules (first match wins) and the default format. A budget is not
    applied here: `budget_plan` chooses among its candidates for the weights no rule fixes."""
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


def budget_candidates(model: nn.Module, recipe: Recipe) -> dict[str, list[str]]:
    """{weight name: specs to choose from}: a weight a rule fixes has that one spec, the others the
    budget's candidates (the default format alone when the recipe has no budget)."""
    n_blocks = model.config.num_hidden_layers
    choices = list(recipe.budget.candidates) if recipe.budget else [recipe.format]
    return {
        name: [spec] if recipe.rule_for(name, n_blocks) else choices
        for name, spec in plan_from_recipe(model, recipe).items()
    }


def budget_plan(model: nn.Module, tokenizer, recipe: Recipe, texts: list[str]) -> tuple[dict[str, str], list]:
    """(plan, allocation table) for a recipe with a budget: measure each weight's sensitivity to each
    candidate on the calibration text, then solve the allocation ILP under the budget."""
    if recipe.budget is None:
        raise LightenError(f"recipe {recipe.name!r} has no budget: use plan_from_recipe")
    candidates = budget_candidates(model, recipe)
    probed = {name: specs for name, specs in candidates.items() if len(specs) > 1}
    # Each of the (weights x candidates) probes runs all its tokens: at most PROBE_TOKENS of the calibration.
    costs = layer_sensitivity(
        model,
        tokenizer,
        texts,
        probed,
        n_tokens=min(recipe.calibration.tokens, PROBE_TOKENS),
        context=recipe.calibration.context,
    )
    # A weight a rule fixes has one option, so its cost is the same in every plan: 0 changes no choice.
    costs |= {(name, specs[0]): 0.0 for name, specs in candidates.items() if len(specs) == 1}
    sizes = candidate_sizes(model, candidates)
    n_weights = sum(model.get_parameter(name).numel() for name in candidates)
    plan = allocate_ilp(costs, sizes, parse_budget(recipe.budget.size, n_weights))
    return plan, allocation_table(plan, costs, sizes)
