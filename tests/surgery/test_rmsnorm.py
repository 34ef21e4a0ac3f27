"""layernorm_to_rmsnorm (Pre-RMSNorm): exact on GPT-2 after folding; clear errors otherwise."""

import pytest
import torch
from surgery_helpers import assert_same, output, randomize_norms, token_ids
from tiny_models import tiny_model
from torch import nn

from lighten.errors import ModelError
from lighten.models.arch import model_view, norm_groups
from lighten.norms.token import CRMSNorm
from lighten.surgery import (
    compress_rmsnorm,
    fold_norm_affine,
    layernorm_to_rmsnorm,
    rotate_residual_hadamard,
)


def test_gpt2_pre_rmsnorm_is_exact_and_zero_mean():
    model = randomize_norms(tiny_model("gpt2"))
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    layernorm_to_rmsnorm(fold_norm_affine(model))
    assert_same(model, ids, ref, "fold+rmsnorm gpt2")
    norms = [g.norm for g in norm_groups(model_view(model))]
    assert len(norms) == 5 and all(type(n) is nn.RMSNorm and n.eps == 1e-5 for n in norms)
    means = []
    handles = [n.register_forward_pre_hook(lambda m, a: means.append(a[0].mean(-1))) for n in norms]
    output(model, ids)
    for h in handles:
        h.remove()
    assert torch.cat(means).abs().max() < 1e-5  # the residual stream is zero-mean everywhere


def test_rmsnorm_needs_folded_norms():
    with pytest.raises(ModelError, match="fold_norm_affine first"):
        layernorm_to_rmsnorm(randomize_norms(tiny_model("gpt2")))


@pytest.mark.parametrize("arch,match", [("llama", "already uses RMSNorm"), ("bert", "post-LN")])
def test_rmsnorm_refuses_other_families(arch, match):
    with pytest.raises(ModelError, match=match):
        layernorm_to_rmsnorm(tiny_model(arch))


def test_gpt2_pre_crmsnorm_is_exact_with_one_channel_less():
    model = randomize_norms(tiny_model("gpt2"))
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    compress_rmsnorm(layernorm_to_rmsnorm(fold_norm_affine(model)))
    assert_same(model, ids, ref, "fold+rmsnorm+crmsnorm gpt2")
    assert model.transformer.wte.weight.shape[1] == 63 and model.lm_head.weight.shape[1] == 63
    assert isinstance(model.transformer.h[0].ln_1, CRMSNorm)


def test_crmsnorm_needs_pre_rmsnorm_first():
    with pytest.raises(ModelError, match="after layernorm_to_rmsnorm"):
        compress_rmsnorm(fold_norm_affine(tiny_model("gpt2")))
    rotated = rotate_residual_hadamard(layernorm_to_rmsnorm(fold_norm_affine(tiny_model("gpt2"))))
    with pytest.raises(ModelError, match="not rotated"):
        compress_rmsnorm(rotated)
