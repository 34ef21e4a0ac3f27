"""Recipe files: loading, validation messages, and the plans they give."""

import pytest
from tiny_models import sample_text, tiny_model, tiny_tokenizer

from lighten.algorithms.allocate import candidate_sizes, parse_budget, total_size
from lighten.errors import LightenError, SpecError
from lighten.quantize import quantize_weights
from lighten.recipes import (
    budget_candidates,
    budget_plan,
    load_recipe,
    parse_recipe,
    plan_from_recipe,
    shipped_recipes,
)


def test_shipped_recipes_load_by_name():
    assert shipped_recipes() == ["budget-4.5bits", "int4-g128-keep-sensitive", "int8-weights"]
    budget = load_recipe("budget-4.5bits").budget
    assert budget.size == "4.5bits"
    assert budget.candidates == ("int2:g64:sym", "int3:g128:sym", "int4:g128:sym", "int8:channel:sym")
    assert load_recipe("int8-weights").format == "int8:channel:sym"


def test_recipe_file_by_path_is_named_after_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("format: int4\nsurgery: [fold, rotate]\nalgorithm: gptq\ncalibration: {tokens: 64}\n")
    recipe = load_recipe(path)
    assert (recipe.name, recipe.format, recipe.surgery, recipe.algorithm) == (
        "mine",
        "int4:g128:sym",
        ("fold", "rotate"),
        "gptq",
    )
    assert (recipe.calibration.tokens, recipe.calibration.context) == (64, 256)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": "int4", "colour": "red"}, "colour: unknown key"),
        ({"algorithm": "rtn"}, "format: missing"),
        ({"format": "int4", "algorithm": "sgd"}, "algorithm: 'sgd' is not one of"),
        ({"format": "int4", "surgery": ["fold", "smoth"]}, r"surgery\[1\]: unknown step .smoth."),
        ({"format": "int4", "surgery": "fold"}, "surgery: must be a list"),
        ({"format": "int4", "rules": [{"pattern": "(", "format": "int8"}]}, r"rules\[0\].pattern: bad regex"),
        ({"format": "int4", "rules": [{"pattern": "x"}]}, r"rules\[0\]: must be"),
        ({"format": "int4", "budget": {"size": "4.5bits"}}, "budget: must be"),
        (
            {"format": "int4", "budget": {"size": "lots", "candidates": ["int4", "int8"]}},
            "budget.size: budget .lots.",
        ),
        ({"format": "int4", "budget": {"size": "4bits", "candidates": ["int4"]}}, "at least two"),
        ({"format": "int4", "calibration": {"tokens": 1}}, "calibration.tokens: must be an integer >= 2"),
        ({"format": "int4", "embeddings": "yes"}, "embeddings: must be true or false"),
        (["format", "int4"], "a recipe is a mapping"),
    ],
)
def test_validation_names_the_key(data, message):
    with pytest.raises(LightenError, match=message):
        parse_recipe(data)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"format": "int9"}, "format"),
        ({"format": "int4", "rules": [{"pattern": "x", "format": "int4:g0"}]}, r"rules\[0\].format"),
        ({"format": "int4", "budget": {"size": "4bits", "candidates": ["int4", "nf5"]}}, r"candidates\[1\]"),
    ],
)
def test_bad_specs_raise_spec_error_naming_the_key(data, key):
    with pytest.raises(SpecError, match=key):
        parse_recipe(data)


def test_yaml_syntax_error_and_unknown_name(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("format: int4\nrules: [\n")
    with pytest.raises(LightenError, match="line 3"):
        load_recipe(path)
    with pytest.raises(LightenError, match="shipped: budget-4.5bits"):
        load_recipe("int5-weights")


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
