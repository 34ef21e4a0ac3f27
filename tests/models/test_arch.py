"""The model view finds, for each family, the norms and the linears that read them."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import T5Config, T5EncoderModel

from lighten.errors import ModelError
from lighten.models.arch import model_view, norm_groups, value_proj, weight_out_in


@pytest.mark.parametrize(
    "arch,family,pre_norm,fed",
    [
        ("llama", "llama", True, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
        ("qwen2", "llama", True, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
        ("gpt2", "gpt2", True, ["c_attn", "c_fc"]),
        ("bert", "bert", False, ["query", "key", "value", "intermediate.dense"]),
        ("gpt_neox", "neox", True, ["query_key_value", "dense_h_to_4h"]),
        ("phi3", "phi3", True, ["qkv_proj", "gate_up_proj"]),
        ("gemma2", "gemma", True, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
        # no pre-norms: the linears read the residual stream, i.e. the sub-layer's own input
        ("olmo2", "olmo2", False, ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
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
    neox = tiny_model("gpt_neox")
    view = model_view(neox)
    assert view.final.name == "gpt_neox.final_layer_norm"
    assert list(view.final.linears.values()) == [neox.get_output_embeddings()]


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
    """Whether the group's linears read its norm's output (without a norm: its sub-layer's input)."""
    seen = {}
    if group.norm is None:
        sub_layer = model.get_submodule(group.name)
        hooks = [
            sub_layer.register_forward_pre_hook(
                lambda m, a, k: seen.__setitem__("norm", a[0] if a else k["hidden_states"]), with_kwargs=True
            )
        ]
    else:
        hooks = [group.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("norm", o))]
    for name, lin in group.linears.items():
        hooks.append(lin.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0])))
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6, 7, 8]]))
    for h in hooks:
        h.remove()
    return all(torch.equal(seen[name], seen["norm"]) for name in group.linears)


@pytest.mark.parametrize("arch,n_groups", [("llama", 5), ("gpt2", 5), ("bert", 4)])
def test_norm_groups_in_forward_order(arch, n_groups):
    view = model_view(tiny_model(arch))
    groups = norm_groups(view)
    assert len(groups) == n_groups and groups[:2] == [view.blocks[0].attn, view.blocks[0].mlp]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert", "phi3", "gpt_neox"])
def test_value_proj_rows_are_the_values(arch):
    """Zeroing the rows value_proj names zeroes the attention output (softmax-weighted sums of values)."""
    model = tiny_model(arch)
    view = model_view(model)
    block = view.blocks[0]
    v, rows = value_proj(view, block)
    with torch.no_grad():
        weight_out_in(v)[rows] = 0
        if v.bias is not None:
            v.bias[rows] = 0
    seen = {}
    out = block.attn_out[1]
    out.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(torch.tensor([[4, 5, 6, 7, 8]]))
    assert seen["x"].abs().max() == 0
