"""AWQ: the scale search against plain rounding, and the exactness of folding scales into norms."""

import copy

import pytest
import torch
from tiny_models import sample_text, tiny_model, tiny_tokenizer
from torch import nn

from lighten import formats
from lighten.algorithms.activations import collect_input_stats
from lighten.algorithms.awq import awq_apply, awq_error, awq_scale_group, awq_search_scales
from lighten.models.arch import model_view
from lighten.plan import make_plan
from lighten.surgery.smooth import scale_norm_group


def _salient_layer(seed=0):
    """Two linears reading x [tokens, 128] in which a few channels are 10-30x larger, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    x[:, :4] *= torch.tensor([10.0, 15.0, 20.0, 30.0])
    linears = [nn.Linear(128, n, bias=False) for n in (48, 96)]
    for lin in linears:
        nn.init.normal_(lin.weight, generator=g)
    return x, linears


def test_alpha_zero_is_rtn():
    fmt, (x, linears) = formats.get("int4:g32"), _salient_layer()
    w = linears[0].weight.detach()
    rtn_error = (x @ (fmt.fake_quantize(w) - w).t()).square().sum().item()
    assert awq_error(x, linears[:1], fmt, torch.ones(128)) == pytest.approx(rtn_error, rel=1e-6)
    # The search starts at alpha = 0 (s = 1) and only moves on a strict improvement.
    s = awq_search_scales(x, linears, fmt, grid=4)
    assert awq_error(x, linears, fmt, s) <= awq_error(x, linears, fmt, torch.ones(128))


@pytest.mark.parametrize("spec", ["int4:g32", "int3:g64:asym", "nf4"])
def test_search_beats_rtn_on_salient_channels(spec):
    fmt, (x, linears) = formats.get(spec), _salient_layer(1)
    s = awq_search_scales(x, linears, fmt)
    assert awq_error(x, linears, fmt, s) < awq_error(x, linears, fmt, torch.ones(128))
    assert s[:4].min() > s[4:].max()  # the loud channels are the protected ones


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_folded_scales_keep_the_model_exact(arch):
    model, ids = tiny_model(arch), torch.tensor([tiny_tokenizer()(sample_text(60))["input_ids"]])
    folded = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    for group in (g_ for b in model_view(folded).blocks for g_ in (b.attn, b.mlp)):
        scale_norm_group(group, torch.rand(64, generator=g) * 4 + 0.25)
    with torch.no_grad():
        torch.testing.assert_close(
            folded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-4
        )


def test_awq_apply_quantizes_the_folded_model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    plan = make_plan(model, "int4:g32")
    stats = collect_input_stats(model, tok, [sample_text(600)], n_tokens=256, context=64, samples=256)
    before = copy.deepcopy(model)
    q = awq_apply(model, stats, plan)
    assert q.keys() == plan.keys()
    view, ref = model_view(model), model_view(before)
    # Each norm and its readers changed by the same scales: gamma * W stays (numerically) the same.
    for b, rb in zip(view.blocks, ref.blocks, strict=True):
        for group, rgroup in ((b.attn, rb.attn), (b.mlp, rb.mlp)):
            for lin, rlin in zip(group.linears.values(), rgroup.linears.values(), strict=True):
                torch.testing.assert_close(lin.weight * group.norm.weight, rlin.weight * rgroup.norm.weight)


def test_awq_into_gguf_weighs_columns_by_the_rescaled_inputs():
    """For a GGUF type each reader's importance is mean (x / s)^2 of its rescaled inputs, and llama.cpp's
    search weighted by it leaves less importance-weighted error than the unweighted reference encoder."""
    model = tiny_model("llama")
    plan, fmt = make_plan(model, "q4_0"), formats.get("q4_0")
    before = copy.deepcopy(model)
    group, rgroup = model_view(model).blocks[0].mlp, model_view(before).blocks[0].mlp
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0)) * (torch.arange(64) % 7 + 0.5)
    importance = awq_scale_group(group, x, plan)
    s = rgroup.norm.weight / group.norm.weight  # the norm holds gamma / s after folding
    assert importance.keys() == group.linears.keys()
    weighted = unweighted = 0.0
    for name, linear in group.linears.items():
        torch.testing.assert_close(importance[name], (x / s).square().mean(0), rtol=1e-4, atol=0)
        w, imp = linear.weight.detach(), importance[name]
        weighted += ((fmt.quantize(w, importance=imp).dequantize() - w).square() * imp).sum().item()
        unweighted += ((fmt.quantize(w).dequantize() - w).square() * imp).sum().item()
    assert weighted < 0.9 * unweighted
