"""The plan (which weights get quantized) and round-to-nearest quantization of a whole model."""

import pytest
import torch
from tiny_models import tiny_model

from lighten import formats
from lighten.errors import LightenError, SpecError
from lighten.quantize import dequantize_weight, make_plan, quantize_weights


def test_plan_covers_linears_and_skips_lm_head_norms_embeddings():
    plan = make_plan(tiny_model("llama"), "int4:g32")
    assert len(plan) == 2 * 7  # q k v o gate up down per layer
    assert all(".layers." in name and name.endswith("_proj.weight") for name in plan)
    assert set(plan.values()) == {formats.get("int4:g32").name}


def test_plan_on_tied_model_quantizes_the_shared_table_once():
    model = tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plan = make_plan(model, "int8", skip=(), embeddings=True)
    assert "model.embed_tokens.weight" in plan and "lm_head.weight" not in plan
    # Without embeddings the tied lm_head is left alone even when not skipped: it *is* the embedding.
    assert "lm_head.weight" not in make_plan(model, "int8", skip=())


def test_plan_untied_lm_head_is_quantized_when_not_skipped():
    assert "lm_head.weight" in make_plan(tiny_model("qwen2"), "int8", skip=())


def test_plan_errors():
    model = tiny_model("gpt2")
    with pytest.raises(SpecError):
        make_plan(model, "int9")
    with pytest.raises(LightenError, match="empty"):
        make_plan(model, "int8", skip=(".",))
    with pytest.raises(LightenError, match="--skip"):
        make_plan(model, "int8", skip=("(",))


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_quantize_weights_matches_fake_quantize_of_each_weight(arch):
    """The [out, in] orientation matters for GPT-2's transposed Conv1D: groups must run along inputs."""
    model = tiny_model(arch)
    plan = make_plan(model, "int4:g16")
    quantized = quantize_weights(model, plan)
    fmt = formats.get("int4:g16")
    for name, q in quantized.items():
        w = model.get_parameter(name).detach()
        as_out_in = w.t() if arch == "gpt2" else w
        assert q.shape == tuple(as_out_in.shape)
        torch.testing.assert_close(
            dequantize_weight(model, name, q), _orient(fmt.fake_quantize(as_out_in), arch), rtol=0, atol=0
        )


def _orient(w, arch):
    return w.t() if arch == "gpt2" else w
