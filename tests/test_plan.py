"""Plans: which weights a recipe (or a bare format) quantizes, and to what; budgets by sensitivity + ILP."""

from collections import Counter

import pytest
from tiny_models import sample_text, tiny_model, tiny_tokenizer

from lighten import formats
from lighten.algorithms.allocate import candidate_sizes, total_size
from lighten.errors import LightenError, SpecError
from lighten.plan import (
    GGUF_CANDIDATES,
    budget_candidates,
    budget_choices,
    budget_plan,
    make_plan,
    plan_from_recipe,
)
from lighten.quantize import quantize_weights, weight_shape
from lighten.recipes import budget_bits, load_recipe, parse_budget, parse_recipe

LM_HEAD_TOO = {"pattern": "^lm_head", "format": "int8"}
# Tiny Llamas whose rows meet GGUF's blocks every way: the hidden size 64 is whole 32-blocks but no
# 256-block, o_proj reads 4 heads of 64 = 256 inputs, and down_proj reads the intermediate size.
KQUANT_ROWS = dict(head_dim=64, intermediate_size=256)  # down_proj: rows of 256
MIXED_ROWS = dict(head_dim=64, intermediate_size=48)  # down_proj: rows of 48, not even whole 32-blocks
SMALL_TYPES = ["q4_0", "iq4_nl", "q5_0", "q5_1", "q8_0"]  # blocks of 32
K_TYPES = ["q4_k", "q5_k", "q6_k", "iq4_xs"]  # blocks of 256
CALIBRATION = {"tokens": 48, "context": 48}


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
    plan, table, summary = budget_plan(model, tiny_tokenizer(), recipe, [sample_text(200)])
    n_weights = sum(model.get_parameter(name).numel() for name in plan)
    budget = parse_budget("4.5bits", n_weights)
    assert total_size(plan, candidate_sizes(model, candidates)) <= budget
    assert sum(q.nbytes for q in quantize_weights(model, plan).values()) <= budget  # what is stored
    assert plan["model.layers.0.mlp.down_proj.weight"] == "int8:channel:sym"
    assert len(set(plan.values())) > 1  # 4.5 bits sits between the candidates: the plan must mix them
    assert [row["name"] for row in table] == list(plan)
    # Not a GGUF budget: it counts every weight it plans, as before GGUF budgets existed.
    assert summary["counts"] == "quantized weights" and summary["weights"] == n_weights
    assert summary["sensitivity"] == "kl" and summary["not_counted"] == {}


def test_fallback_stores_each_weight_in_llama_quantize_s_type_or_keeps_it():
    model = tiny_model("llama", **MIXED_ROWS)
    with pytest.raises(
        LightenError, match=r"q_proj.weight: 64 wide\): give --fallback \(recipe: fallback: true\).*as q5_0"
    ):
        plan_from_recipe(model, parse_recipe({"format": "q4_k"}))
    plan = plan_from_recipe(model, parse_recipe({"format": "q4_k", "fallback": True}))
    for name in make_plan(model, "int8"):  # every weight a format could take
        fallback = formats.get("q4_k").fallback_for(weight_shape(model, name))
        assert plan.get(name) == (fallback and fallback.name), name
    assert set(plan.values()) == {"q4_k", "q5_0"} and not any("down_proj" in name for name in plan)
    with pytest.raises(LightenError, match="nothing to quantize"):  # q4_0 has no fallback, and 48 fits none
        plan_from_recipe(
            model,
            parse_recipe(
                {"format": "q4_0", "fallback": True, "rules": [{"pattern": "attn|gate|up", "format": "keep"}]}
            ),
        )


def test_a_gguf_budget_offers_each_weight_the_types_its_rows_fit():
    model = tiny_model("llama", **KQUANT_ROWS)
    candidates = budget_candidates(model, parse_recipe({"format": "q4_k", "budget": {"size": "4.5bits"}}))
    assert list(candidates) == list(make_plan(model, "int8"))
    for name, specs in candidates.items():
        whole = weight_shape(model, name)[-1] % 256 == 0
        assert specs == SMALL_TYPES + K_TYPES if whole else specs == SMALL_TYPES, name
    assert sum(len(specs) > len(SMALL_TYPES) for specs in candidates.values()) == 4  # o_proj, down_proj


@pytest.mark.parametrize(
    "size, low",
    [("4.5bits", []), ("4.49bits", ["q3_k"]), ("3.5bits", ["q3_k"]), ("3.4bits", ["q3_k", "q2_k"])],
)
def test_low_bit_k_quants_join_low_budgets_and_the_format_always_joins(size, low):
    recipe = parse_recipe({"format": "q4_1", "budget": {"size": size}})
    assert budget_choices(recipe, budget_bits(size, 1000)) == [*GGUF_CANDIDATES, *low, "q4_1"]
    listed = parse_recipe({"format": "q4_1", "budget": {"size": size, "candidates": ["q2_k", "q8_0"]}})
    assert budget_choices(listed, budget_bits(size, 1000)) == ["q2_k", "q8_0"]


def test_listed_candidates_a_weight_cannot_take_are_dropped_and_one_none_fits_needs_fallback():
    model = tiny_model("llama", **MIXED_ROWS)
    recipe = {"format": "q4_k", "budget": {"size": "6bits", "candidates": ["q4_k", "q8_0"]}}
    message = r"fits the rows of model\.layers\.0\.mlp\.down_proj\.weight \(48 wide\) and 1 more.*--fallback"
    with pytest.raises(LightenError, match=message):
        budget_candidates(model, parse_recipe(recipe))
    candidates = budget_candidates(model, parse_recipe(recipe | {"fallback": True}))
    assert not any("down_proj" in name for name in candidates)
    assert candidates["model.layers.1.self_attn.o_proj.weight"] == ["q4_k", "q8_0"]  # rows of 256
    assert candidates["model.layers.1.self_attn.q_proj.weight"] == ["q8_0"]  # rows of 64


@pytest.mark.parametrize(
    "arch, recipe, outside",
    [
        ("llama", {"embeddings": True}, {"model.embed_tokens.weight": "q8_0"}),  # tied: the output matrix too
        ("qwen2", {"rules": [{"pattern": "^lm_head", "format": "q5_0"}]}, {"lm_head.weight": "q5_0"}),
        ("qwen2", {}, {}),  # untied lm_head and embeddings kept: the GGUF export writes them as --type
    ],
)
def test_a_gguf_budget_counts_the_block_matrices_only(arch, recipe, outside):
    model = tiny_model(arch, initializer_range=0.2, **KQUANT_ROWS)
    budget = {"size": "4.5bits"}
    recipe = parse_recipe({"format": "q4_k", "budget": budget, "calibration": CALIBRATION} | recipe)
    plan, table, summary = budget_plan(model, tiny_tokenizer(), recipe, [sample_text(200)])
    blocks = [name for name in plan if ".layers." in name]
    assert {name: plan[name] for name in plan if name not in blocks} == outside == summary["not_counted"]
    assert [row["name"] for row in table] == list(plan) and all(r["format"] in r["candidates"] for r in table)
    stored = quantize_weights(model, plan)  # the bytes a checkpoint holds
    n_weights = sum(model.get_parameter(name).numel() for name in blocks)
    block_bytes = sum(stored[name].nbytes for name in blocks)
    assert summary["counts"] == "block matrices" and summary["weights"] == n_weights
    assert summary["bytes"] == block_bytes <= summary["bytes_allowed"] == parse_budget("4.5bits", n_weights)
    assert summary["bits_per_weight"] == 8 * block_bytes / n_weights <= 4.5
    assert len({plan[name] for name in blocks}) > 1  # spent unevenly where the costs say so


@pytest.mark.real
def test_smollm2_rows_of_576_take_q5_0_for_q4_k_and_keep_the_k_quants_for_down_proj(smollm2):
    model, _ = smollm2
    with pytest.raises(LightenError, match=r"180 of the 210 weights .*give --fallback.*this one as q5_0"):
        plan_from_recipe(model, parse_recipe({"format": "q4_k"}))
    plan = plan_from_recipe(model, parse_recipe({"format": "q4_k", "fallback": True}))
    assert Counter(plan.values()) == {"q5_0": 180, "q4_k": 30}
    assert all(spec == "q4_k" for name, spec in plan.items() if "down_proj" in name)  # rows of 1536
    candidates = budget_candidates(model, parse_recipe({"format": "q4_k", "budget": {"size": "4.5bits"}}))
    assert Counter(map(tuple, candidates.values())) == {
        tuple(SMALL_TYPES): 180,
        tuple(SMALL_TYPES + K_TYPES): 30,
    }
