"""apply_surgery: the named steps in order, with prerequisites and statistics checked."""

from types import SimpleNamespace

import pytest
from surgery_helpers import assert_same, input_stats, output, randomize_norms, token_ids
from tiny_models import tiny_model

from lighten.errors import LightenError, ModelError
from lighten.surgery import SURGERY_STEPS, apply_surgery


def test_steps_are_described():
    assert list(SURGERY_STEPS) == ["fold", "rmsnorm", "rotate", "rotate_fused", "smooth", "osplus"]
    assert all(isinstance(d, str) and d for d in SURGERY_STEPS.values())


@pytest.mark.parametrize(
    "arch,steps",
    [
        ("gpt2", ["fold", "rmsnorm", "rotate", "smooth"]),
        ("gpt2", ["fold", "osplus"]),
        ("llama", ["fold", "rotate", "osplus"]),
        ("qwen2", ["fold", "rotate", "smooth"]),
        ("llama", ["fold", "rotate_fused"]),
        ("qwen2", ["fold", "rotate_fused", "smooth"]),
        ("gpt2", ["fold", "rmsnorm", "rotate_fused", "osplus"]),
    ],
)
def test_pipelines_are_exact(arch, steps):
    model = randomize_norms(tiny_model(arch))
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)

    def stats(m):  # per module name, a record like collect_input_stats's InputStats
        s = input_stats(m, ids)
        return {n: SimpleNamespace(absmax=s["absmax"][n], min=s["min"][n], max=s["max"][n]) for n in s["max"]}

    apply_surgery(model, steps, stats=stats)
    assert_same(model, ids, ref, f"{'+'.join(steps)} {arch}")


@pytest.mark.parametrize(
    "steps,match",
    [
        (["fold", "bogus"], "unknown surgery step"),
        (["rotate", "fold"], "in the order"),
        (["fold", "fold"], "at most once"),
        (["fold", "smooth", "osplus"], "one of smooth and osplus"),
        (["fold", "rotate", "rotate_fused"], "one of rotate and rotate_fused"),
        (["fold", "rotate_fused", "rotate"], "in the order"),
        (["smooth"], "activation statistics"),
    ],
)
def test_bad_step_lists(steps, match):
    with pytest.raises(LightenError, match=match):
        apply_surgery(tiny_model("llama"), steps)


def test_missing_prerequisite_is_a_model_error():
    with pytest.raises(ModelError, match="fold_norm_affine first"):
        apply_surgery(randomize_norms(tiny_model("llama")), ["rotate"])
    with pytest.raises(ModelError, match="layernorm_to_rmsnorm first"):
        apply_surgery(tiny_model("gpt2"), ["fold", "rotate"])
