"""smooth_quant and outlier_suppression_plus: exact on pre-norm models, flatter inputs, refusals on BERT."""

import copy

import pytest
import torch
from surgery_helpers import assert_same, input_stats, outlier_ratio, output, randomize_norms, token_ids
from tiny_models import tiny_model

from lighten.errors import ModelError
from lighten.models.arch import model_view, value_proj, weight_out_in
from lighten.surgery import outlier_suppression_plus, smooth_quant, smooth_values


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_smooth_quant_is_exact_and_flattens(arch):
    model = randomize_norms(tiny_model(arch))
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    ratio = outlier_ratio(model, ids)
    smooth_quant(model, input_stats(model, ids)["absmax"], alpha=0.5)
    assert_same(model, ids, ref, f"smooth {arch}")
    assert outlier_ratio(model, ids) < ratio


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_outlier_suppression_plus_is_exact(arch):
    model = randomize_norms(tiny_model(arch))
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    ratio = outlier_ratio(model, ids)
    stats = input_stats(model, ids)
    outlier_suppression_plus(model, stats["min"], stats["max"])
    assert_same(model, ids, ref, f"osplus {arch}")
    assert outlier_ratio(model, ids) < ratio
    if arch == "gpt2":  # LayerNorm: shifted, so every channel's range is now centred on 0
        after = input_stats(model, ids)
        name = next(iter(model_view(model).blocks[0].attn.linears))
        centre, half = (
            (after["max"][name] + after["min"][name]) / 2,
            (after["max"][name] - after["min"][name]),
        )
        assert (centre.abs() <= 1e-5 * half.max()).all()


def test_missing_statistics_name_the_linears():
    model = tiny_model("llama")
    with pytest.raises(ModelError, match="model.layers.0.self_attn.q_proj"):
        smooth_quant(model, {})


def test_post_ln_bert_is_refused_unchanged():
    model = randomize_norms(tiny_model("bert"))
    ids = token_ids(model.config.vocab_size)
    stats = input_stats(model, ids)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match="post-LN"):
        smooth_quant(model, stats["absmax"])
    with pytest.raises(ModelError, match="post-LN"):
        outlier_suppression_plus(model, stats["min"], stats["max"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.real
@pytest.mark.parametrize("method", ["smooth", "osplus"])
def test_smooth_smollm2(smollm2, method):
    model = copy.deepcopy(smollm2[0])
    ids = token_ids(model.config.vocab_size, n=8)
    ref = output(model, ids)
    ratio = outlier_ratio(model, ids)
    stats = input_stats(model, ids)
    if method == "smooth":
        smooth_quant(model, stats["absmax"])
    else:  # RMSNorm has no β: OS+ can only scale here
        outlier_suppression_plus(model, stats["min"], stats["max"])
    assert_same(model, ids, ref, f"{method} smollm2")
    smoothed = outlier_ratio(model, ids)
    print(
        f"smollm2 norm-group input max/median channel absmax: {ratio:.1f} -> {smoothed:.1f} ({method} α=0.5)"
    )
    assert smoothed < ratio


@pytest.mark.real
def test_smooth_minilm_refuses(minilm):
    model = copy.deepcopy(minilm[0])
    ids = token_ids(model.config.vocab_size, n=8)
    with pytest.raises(ModelError, match="post-LN"):
        smooth_quant(model, input_stats(model, ids)["absmax"])


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "qwen2"])
def test_smooth_values_is_exact_everywhere(arch):
    model = randomize_norms(tiny_model(arch))
    view = model_view(model)
    with torch.no_grad():  # a few outlier value channels in every layer
        for block in view.blocks:
            v, rows = value_proj(view, block)
            weight_out_in(v)[rows][[1, 17, 30]] *= 8
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    names = [b.attn_out[0] for b in view.blocks]
    before = input_stats(model, ids)["absmax"]
    smooth_values(model, before)
    assert_same(model, ids, ref, f"smooth_values {arch}")
    after = input_stats(model, ids)["absmax"]
    for name in names:
        assert after[name].max() / after[name].median() < before[name].max() / before[name].median()


@pytest.mark.real
def test_smooth_values_minilm(minilm):
    model = copy.deepcopy(minilm[0])
    ids = token_ids(model.config.vocab_size, n=8)
    ref = output(model, ids)
    smooth_values(model, input_stats(model, ids)["absmax"])
    assert_same(model, ids, ref, "smooth_values minilm")
