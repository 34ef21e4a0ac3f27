"""fold_norm_affine: exact on pre-norm models, a clear refusal on post-LN BERT."""

import copy

import pytest
import torch
from surgery_helpers import assert_same, output, randomize_norms, token_ids
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM

from lighten.errors import ModelError
from lighten.models.arch import model_view, norm_groups
from lighten.surgery import fold_norm_affine, rotate_residual_hadamard


def _folded(model) -> bool:
    for g in norm_groups(model_view(model)):
        beta = getattr(g.norm, "bias", None)
        if not (g.norm.weight == 1).all() or (beta is not None and beta.any()):
            return False
    return True


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_fold_is_exact(arch):
    model = randomize_norms(tiny_model(arch))
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    before = copy.deepcopy(model.state_dict())
    fold_norm_affine(model)
    assert_same(model, ids, ref, f"fold {arch}")
    assert _folded(model)
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("lm_head" in k for k in changed) and len(changed) > 8


def test_fold_unties_lm_head_and_reloads(tmp_path):
    model = randomize_norms(tiny_model("llama"))
    ids = token_ids(model.config.vocab_size)
    embedding = model.get_input_embeddings().weight.detach().clone()
    fold_norm_affine(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the final γ went to lm_head only
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(output(reloaded, ids), output(model, ids))


def test_post_ln_bert_cannot_be_folded():
    model = randomize_norms(tiny_model("bert"))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match="post-LN.*residual stream"):
        fold_norm_affine(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.real
def test_fold_smollm2(smollm2):
    model = copy.deepcopy(smollm2[0])
    ids = token_ids(model.config.vocab_size, n=8)
    ref = output(model, ids)
    fold_norm_affine(model)
    assert_same(model, ids, ref, "fold smollm2")
    assert _folded(model)


@pytest.mark.real
def test_fold_minilm_refuses(minilm):
    with pytest.raises(ModelError, match="post-LN"):
        fold_norm_affine(copy.deepcopy(minilm[0]))


def test_base_model_without_head_keeps_its_final_norm():
    model = randomize_norms(tiny_model("llama")).model  # LlamaModel: the final norm's output is the output
    ids = token_ids(model.config.vocab_size)
    ref = output(model, ids)
    fold_norm_affine(model)
    assert_same(model, ids, ref, "fold llama base model")
    assert not (model.norm.weight == 1).all()
    with pytest.raises(ModelError, match="language-model head"):
        rotate_residual_hadamard(model)
