"""apply_surgery: the named steps in order, with prerequisites and statistics checked."""

from types import SimpleNamespace

import pytest
import torch
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
        ("mistral", ["fold", "rotate", "smooth"]),
        ("qwen3", ["fold", "rotate", "smooth"]),
        ("granite", ["fold", "rotate", "smooth"]),  # its multipliers scale whole vectors: they commute
        ("phi3", ["fold", "rotate", "smooth"]),
        ("phi3", ["fold", "rotate_fused", "osplus"]),
        ("stablelm", ["fold", "osplus"]),  # LayerNorm with bias: no rotation without Pre-RMSNorm
        ("gpt_neox", ["fold", "rmsnorm", "rotate", "smooth"]),  # two LayerNorms of one stream, in parallel
        ("gpt_neox", ["fold", "osplus"]),
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


def gemma(arch: str):
    """Tiny Gemma with random gains: at init its w = 0 (gain 1 + w = 1), where any fold changes nothing."""
    model = tiny_model(arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_folds_and_smooths_exactly_and_refuses_rotation(arch):
    """Gemma normalizes each sub-layer's output before the residual add (post_attention_layernorm is that
    norm, not the MLP's pre-norm as in Llama) and scales its RMSNorms by (1 + w). Its pre-norms fold and
    smooth exactly; rotation is refused with the reason, the model unchanged."""
    model = gemma(arch)
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)

    def stats(m):
        s = input_stats(m, ids)
        return {n: SimpleNamespace(absmax=s["absmax"][n], min=s["min"][n], max=s["max"][n]) for n in s["max"]}

    apply_surgery(model, ["fold", "smooth"], stats=stats)
    assert_same(model, ids, ref, f"fold+smooth {arch}")
    layer = model.model.layers[0]
    assert layer.post_attention_layernorm.weight.abs().sum() > 0  # an output norm: not folded, kept
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="normalizes each sub-layer's output"):
        apply_surgery(model, ["rotate"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("step", ["fold", "smooth", "osplus"])
def test_olmo2_has_no_pre_norm_to_rewrite(step):
    """OLMo-2 normalizes only the sub-layers' outputs: its linears read the residual stream itself."""
    model = tiny_model("olmo2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="OLMo-2 has no norm before its sub-layers"):
        apply_surgery(model, [step], stats=lambda m: {})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_rewrite_that_is_not_exact_is_refused_and_the_model_untouched(monkeypatch):
    """The self-check after each step: a fold that forgets Gemma's (1 + w) (what lighten did before it read
    gains through norm_gain: 1.1-1.3 of the largest logit off, silently) is refused, naming the step and
    the model type, and the model, and every reference into it, stays as it was."""
    from lighten.surgery import fold as fold_module

    monkeypatch.setattr(fold_module, "norm_gain", lambda norm: norm.weight.detach().float())
    model = gemma("gemma2")
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = model.model.layers
    with pytest.raises(LightenError, match="surgery step 'fold' is not exact on this gemma2 model"):
        apply_surgery(model, ["fold"])
    assert model.model.layers is layers and set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(output(model, ids), ref)


def test_the_check_catches_any_step_and_restores_hooks(monkeypatch):
    """A step that leaves the model changed (here a rotate with a bug: one weight scaled after it) is caught
    after that step; the modules and hooks the steps before it changed or added are as they were again."""
    from lighten.surgery import apply as apply_module

    def buggy_rotate(model, **options):
        real_rotate(model, **options)
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.01)

    real_rotate = apply_module.rotate_residual_hadamard
    monkeypatch.setattr(apply_module, "rotate_residual_hadamard", buggy_rotate)
    model = randomize_norms(tiny_model("llama"))
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    with pytest.raises(LightenError, match="surgery step 'rotate' is not exact on this llama model"):
        apply_surgery(model, ["fold", "rotate"])
    assert torch.equal(output(model, ids), ref)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # fold's untying undone
    assert not any(m._forward_pre_hooks for m in model.modules())  # no online Hadamard left behind
