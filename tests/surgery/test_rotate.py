"""rotate_residual_hadamard (QuaRot-style): exact on folded RMSNorm models; clear errors otherwise."""

import copy

import pytest
import torch
from surgery_helpers import assert_same, outlier_ratio, output, randomize_norms, token_ids
from tiny_models import tiny_model

from lighten.checkpoint import require_reloadable
from lighten.errors import ModelError
from lighten.models.arch import model_view, norm_groups
from lighten.surgery import (
    Rotation,
    apply_surgery,
    fold_norm_affine,
    layernorm_to_rmsnorm,
    rotate_residual_hadamard,
)


def _prepared(arch):
    model = fold_norm_affine(randomize_norms(tiny_model(arch)))
    return layernorm_to_rmsnorm(model) if arch == "gpt2" else model


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("online,heads", [(True, True), (False, True), (False, False)])
def test_rotation_is_exact(arch, online, heads):
    model = _prepared(arch)
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    before = copy.deepcopy(model.state_dict())
    rotate_residual_hadamard(model, seed=1, online=online, heads=heads)
    view = model_view(model)
    assert_same(model, ids, ref, f"rotate {arch} online={online} heads={heads}")
    after = model.state_dict()
    # Every weight matrix touches the residual stream, so every one of them changed.
    assert all(
        not torch.equal(after[k], v) for k, v in before.items() if k.endswith("weight") and v.ndim == 2
    )
    online_names = [n for n, m in model.named_modules() if isinstance(m, Rotation)]
    assert online_names == ([f"{b.mlp_out[0]}.input_hadamard" for b in view.blocks] if online else [])
    assert torch.equal(output(copy.deepcopy(model), ids), output(model, ids))  # the pre-hooks are copied too
    assert (after.keys() == before.keys()) is not online  # only the online rotations add buffers


def test_rotate_fused_leaves_a_plain_model_with_its_own_output_matrix():
    """The step: fold unties the tied lm_head (it takes the final gain), then everything is rotated in the
    weights; the model saves and loads as the Hugging Face class it was."""
    model = randomize_norms(tiny_model("llama"))
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    apply_surgery(model, ["fold", "rotate_fused"])
    assert_same(model, ids, ref, "fold+rotate_fused llama")
    assert not any(isinstance(m, Rotation) for m in model.modules())
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    assert all(bool((g.norm.weight == 1).all()) for g in norm_groups(model_view(model)))
    require_reloadable(model)


def test_tied_embedding_is_rotated_once_and_stays_tied():
    model = tiny_model("llama")  # γ=1 at init: already folded, and lm_head is tied to the embedding
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    rotate_residual_hadamard(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same(model, ids, ref, "rotate tied llama")


def test_rotation_needs_folded_norms_and_rmsnorm():
    with pytest.raises(ModelError, match="fold_norm_affine first"):
        rotate_residual_hadamard(randomize_norms(tiny_model("llama")))
    with pytest.raises(ModelError, match="layernorm_to_rmsnorm first"):
        rotate_residual_hadamard(fold_norm_affine(randomize_norms(tiny_model("gpt2"))))
    with pytest.raises(ModelError, match="post-LN"):
        rotate_residual_hadamard(tiny_model("bert"))


@pytest.mark.real
def test_rotate_smollm2(smollm2):
    model = copy.deepcopy(smollm2[0])
    ids = token_ids(model.config.vocab_size, n=8)
    ref = output(model, ids)
    ratio = outlier_ratio(model, ids)
    rotate_residual_hadamard(fold_norm_affine(model))
    assert_same(model, ids, ref, "fold+rotate smollm2")
    rotated = outlier_ratio(model, ids)
    print(f"smollm2 norm-group input max/median channel absmax: {ratio:.1f} -> {rotated:.1f} (fold+rotate)")
    assert rotated < ratio


@pytest.mark.real
def test_rotate_fused_smollm2(smollm2):
    model = copy.deepcopy(smollm2[0])
    ids = token_ids(model.config.vocab_size, n=8)
    ref = output(model, ids)
    apply_surgery(model, ["fold", "rotate_fused"])
    assert_same(model, ids, ref, "fold+rotate_fused smollm2")
    assert not any(isinstance(m, Rotation) for m in model.modules())
