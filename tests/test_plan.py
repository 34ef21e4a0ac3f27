"""Plans: which weights a recipe (or a bare format) quantizes, and to what; budgets by sensitivity + ILP."""

import pytest
from tiny_models import sample_text, tiny_model, tiny_tokenizer

from lighten import formats
from lighten.algorithms.allocate import candidate_sizes, total_size
from lighten.errors import LightenError, SpecError
from lighten.plan import budget_candidates, budget_plan, make_plan, plan_from_recipe
from lighten.quantize import quantize_weights
from lighten.recipes import load_recipe, parse_budget, parse_recipe

LM_HEAD_TOO = {"pattern": "^lm_head", "format": "int8"}


def _plan(model, **recipe):
    return plan_from_recipe(model, parse_recipe({"format": "int8", **recipe}))


def test_plan_covers_linears_and_skips_lm_head_norms_embeddings():
    plan = make_plan(tiny_model("llama"), "int4:g32")
    assert len(plan) == 2 * 7  # q k v o gate up down per layer
    assert all(".layers." in name and name.endswith("_proj.weight") for name in plan)
    assert set(plan.values()) == {formats.get("int4:g32").name}


def test_plan_on_tied_model_quantizes_the_shared_table_once():
    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = _plan(model, embeddings=True, rules=[LM_HEAD_TOO])
    assert "model.embed_tokens.weight" in plan and "lm_head.weight" not in plan
    # Without embeddings the tied lm_head is left alone even when a rule names it: it *is* the embedding.
    assert "lm_head.weight" not in _plan(model, rules=[LM_HEAD_TOO])


def test_plan_untied_lm_head_is_quantized_when_a_rule_names_it():
    model = tiny_model("qwen2")
    assert "lm_head.weight" not in make_plan(model, "int8")
    assert "lm_head.weight" in _plan(model, rules=[LM_HEAD_TOO])


def test_plan_errors():
    model = tiny_model("gpt2")
    with pytest.raises(SpecError):
        make_plan(model, "int9")
    with pytest.raises(LightenError, match="nothing to quantize"):
        _plan(model, rules=[{"pattern": ".", "format": "keep"}])


def test_rules_first_match_wins_keep_and_lm_head():
    recipe = parse_recipe(
        {
            "format": "int4:g32",
            "rules": [
                {"pattern": r"layers\.{last}\.mlp", "format": "int8"},
                {"pattern": r"mlp", "format": "int2:g32"},
                {"pattern": r"q_proj", "format": "keep"},
                {"pattern": r"layers\.0\.self_attn\.q_proj", "format": "int8"},  # shadowed by keep
                {"pattern": r"^lm_head", "format": "int8"},
            ],
        }
    )
    plan = plan_from_recipe(tiny_model("qwen2", num_hidden_layers=3), recipe)  # untied lm_head
    assert plan["model.layers.2.mlp.down_proj.weight"] == "int8:channel:sym"
    assert plan["model.layers.1.mlp.up_proj.weight"] == "int2:g32:sym"
    assert not any("q_proj" in name for name in plan)
    assert plan["model.layers.0.self_attn.k_proj.weight"] == "int4:g32:sym"
    assert plan["lm_head.weight"] == "int8:channel:sym"
    # Without a rule naming it, lm_head stays in full precision, as with make_plan's default skip.
    assert "lm_head.weight" not in plan_from_recipe(tiny_model("qwen2"), parse_recipe({"format": "int4"}))


@pytest.mark.parametrize(
    "arch, down", [("llama", "mlp.down_proj"), ("gpt2", "mlp.c_proj"), ("bert", "output.dense")]
)
def test_keep_sensitive_recipe_keeps_first_and_last_down_projections_at_int8(arch, down):
    model = tiny_model(arch, num_hidden_layers=4)
    plan = plan_from_recipe(model, load_recipe("int4-g128-keep-sensitive"))
    int8 = sorted(name for name, spec in plan.items() if spec.startswith("int8"))
    assert len(int8) == 2 and all(down in n and (".0." in n or ".3." in n) for n in int8), int8
    assert sum(spec == "int4:g128:sym" for spec in plan.values()) == len(plan) - 2


def test_budget_plan_fits_the_budget_and_fixed_weights_keep_their_rule():
    model = tiny_model("llama", initializer_range=0.2)
    recipe = parse_recipe(
        {
            "format": "int4:g32",
            "rules": [{"pattern": r"layers\.0\.mlp\.down_proj", "format": "int8"}],
            "budget": {"size": "4.5bits", "candidates": ["int2:g32", "int4:g32", "int8"]},
            "calibration": {"tokens": 48, "context": 48},
        }
    )
    candidates = budget_candidates(model, recipe)
    assert candidates["model.layers.0.mlp.down_proj.weight"] == ["int8:channel:sym"]
    assert candidates["model.layers.1.mlp.down_proj.weight"] == [
        "int2:g32:sym",
        "int4:g32:sym",
        "int8:channel:sym",
    ]
    plan, table = budget_plan(model, tiny_tokenizer(), recipe, [sample_text(200)])
    n_weights = sum(model.get_parameter(name).numel() for name in plan)
    budget = parse_budget("4.5bits", n_weights)
    assert total_size(plan, candidate_sizes(model, candidates)) <= budget
    assert sum(q.nbytes for q in quantize_weights(model, plan).values()) <= budget  # what is stored
    assert plan["model.layers.0.mlp.down_proj.weight"] == "int8:channel:sym"
    assert len(set(plan.values())) > 1  # 4.5 bits sits between the candidates: the plan must mix them
    assert [row["name"] for row in table] == list(plan)
