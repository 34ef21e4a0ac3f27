"""The model view finds, for each family, the norms and the linears that read them."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import T5Config, T5EncoderModel

from lighten.errors import ModelError
from lighten.models.arch import model_view, weight_out_in


@pytest.mark.parametrize(
    "arch,family,pre_norm,fed",
    [
        ("llama", "llama", True, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
        ("qwen2", "llama", True, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
        ("gpt2", "gpt2", True, ["c_attn", "c_fc"]),
        ("bert", "bert", False, ["query", "key", "value", "intermediate.dense"]),
    ],
)
def test_view_of_each_family(arch, family, pre_norm, fed):
    model = tiny_model(arch)
    view = model_view(model)
    assert (view.family, view.pre_norm, len(view.blocks)) == (family, pre_norm, 2)
    for block in view.blocks:
        names = list(block.attn.linears) + list(block.mlp.linears)
        assert [n for n in names if any(n.endswith(f) for f in fed)] == names and len(names) == len(fed)
        # Every linear the view lists is really fed by the norm it names: hook both and compare.
        for group in (block.attn, block.mlp):
            assert _norm_output_feeds(model, group)


def test_final_norm_feeds_lm_head():
    view = model_view(tiny_model("llama"))
    assert view.final.name == "model.norm" and list(view.final.linears) == ["lm_head"]
    assert model_view(tiny_model("bert")).final is None


def test_gqa_head_counts():
    view = model_view(tiny_model("llama"))
    assert (view.num_heads, view.num_kv_heads, view.head_dim) == (4, 2, 16)


def test_unsupported_model_is_a_clear_error():
    model = T5EncoderModel(T5Config(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8))
    with pytest.raises(ModelError, match="not supported"):
        model_view(model)


def test_weight_out_in_is_a_writable_view():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    w = weight_out_in(c_attn)
    assert w.shape == (c_attn.nf, 64)
    with torch.no_grad():
        w[0, 0] = 123.0
    assert c_attn.weight[0, 0] == 123.0


def _norm_output_feeds(model, group) -> bool:
    seen = {}
    hooks = [group.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o))]
    for name, lin in group.linears.items():
        hooks.append(lin.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0])))
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6, 7, 8]]))
    for h in hooks:
        h.remove()
    return all(torch.equal(seen[name], seen["norm"]) for name in group.linears)
