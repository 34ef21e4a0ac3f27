"""Recipe files: loading and validation messages (the plans they give: test_plan.py)."""

import subprocess
import sys

import pytest

from lighten.errors import LightenError, SpecError
from lighten.recipes import budget_bits, load_recipe, parse_budget, parse_recipe, shipped_recipes


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
    assert (recipe.calibration.tokens, recipe.calibration.context) == (64, 512)  # gptq: windows of 512


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
        ({"format": "int4", "budget": {"size": "4.5bits"}}, "budget.candidates: missing"),
        ({"format": "q4_k", "budget": {"candidates": ["q4_0", "q8_0"]}}, "budget: must be"),
        ({"format": "q4_k", "budget": {"size": "4bits", "colour": "red"}}, "budget: must be"),
        ({"format": "q4_k", "budget": {"size": "4bits", "sensitivity": "hessian"}}, "budget.sensitivity"),
        ({"format": "int4", "fallback": True}, "fallback: is for GGUF block types"),
        ({"format": "q4_k", "fallback": "yes"}, "fallback: must be true or false"),
        (
            {"format": "int4", "budget": {"size": "lots", "candidates": ["int4", "int8"]}},
            "budget.size: budget .lots.",
        ),
        ({"format": "int4", "budget": {"size": "4bits", "candidates": ["int4"]}}, "at least two"),
        ({"format": "int4", "calibration": {"tokens": 1}}, "calibration.tokens: must be an integer >= 2"),
        ({"format": "int4", "embeddings": "yes"}, "embeddings: must be true or false"),
        (["format", "int4"], "a recipe is a mapping"),
        ({"format": "int4", "algorithm": "imatrix"}, "algorithm: imatrix weighs the scale search of GGUF"),
    ],
)
def test_validation_names_the_key(data, message):
    with pytest.raises(LightenError, match=message):
        parse_recipe(data)


@pytest.mark.parametrize(
    "data, algorithm, calibration",
    [
        ({"format": "iq4_nl"}, "imatrix", (2048, 512)),  # llama.cpp's importance-weighted search
        ({"format": "Q4_K", "calibration": {"tokens": 64}}, "imatrix", (64, 512)),
        ({"format": "q8_0"}, "rtn", (512, 256)),  # llama.cpp ignores importance for q8_0 and tq*
        ({"format": "int4"}, "rtn", (512, 256)),
        ({"format": "iq4_nl", "algorithm": "awq"}, "awq", (65536, 512)),
        ({"format": "q4_k", "algorithm": "gptq"}, "gptq", (65536, 512)),  # 128 windows of 512
        (
            {"format": "int4", "algorithm": "imatrix", "rules": [{"pattern": "x", "format": "q4_0"}]},
            "imatrix",
            None,
        ),
    ],
)
def test_without_an_algorithm_the_format_chooses(data, algorithm, calibration):
    recipe = parse_recipe(data)
    assert recipe.algorithm == algorithm
    assert calibration is None or (recipe.calibration.tokens, recipe.calibration.context) == calibration


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


def test_parse_budget_units():
    assert parse_budget("12MB", 0) == 12_000_000
    assert parse_budget("12.5MiB", 0) == 12.5 * 2**20
    assert parse_budget(" 300 kb ", 0) == 300_000
    assert parse_budget("1GiB", 0) == 2**30
    assert parse_budget("100B", 0) == 100
    assert parse_budget("4.5bits", 1000) == 562  # floor(4.5 * 1000 / 8)
    assert parse_budget("4bit", 1000) == 500
    for bad in ("", "12", "12 MBs", "-1MB", "four bits", "1e6B", None):
        with pytest.raises(LightenError, match="4.5bits"):
            parse_budget(bad, 1000)


def test_budget_bits_is_the_number_given_or_the_bytes_spread_over_the_weights():
    assert budget_bits("4.5bits", 1000) == 4.5  # exactly: parse_budget's bytes are floored
    assert budget_bits("1KB", 2000) == 4.0


def test_a_gguf_format_gives_a_budget_default_candidates_and_imatrix_sensitivity():
    gguf = parse_recipe({"format": "q4_k", "budget": {"size": "4.5bits"}})
    assert gguf.gguf and gguf.budget.candidates == () and gguf.budget.sensitivity == "imatrix"
    mine = parse_recipe({"format": "int4", "budget": {"size": "4.5bits", "candidates": ["int4", "int8"]}})
    assert not mine.gguf and mine.budget.sensitivity == "kl"
    chosen = {"size": "4.5bits", "candidates": ["q4_0", "q8_0"], "sensitivity": "kl"}
    assert parse_recipe({"format": "q4_k", "budget": chosen}).budget.sensitivity == "kl"
    # A GGUF type in a rule is enough for fallback.
    rule = {"pattern": "down_proj", "format": "q4_k"}
    assert parse_recipe({"format": "int4", "rules": [rule], "fallback": True}).fallback


def test_recipes_import_no_torch():
    """A recipe is checked before torch loads: the schema needs neither it nor anything that imports it."""
    code = "import lighten.recipes, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
