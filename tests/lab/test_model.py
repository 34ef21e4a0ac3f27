"""The lab model: every norm in every placement trains; the placements, LayerNorm Scaling, the embedding
projection, clipped softmax and gated attention compute what their papers define (worked by hand)."""

import pytest
import torch
from torch import nn

from lighten.errors import LightenError
from lighten.lab.model import PLACEMENTS, LabConfig, LabModel, build_lab_model, clipped_softmax
from lighten.norms import NORMS, DepthScaled

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
IDS = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("norm", list(NORMS))
def test_every_norm_in_every_placement_trains(norm, placement):
    torch.manual_seed(0)
    model = build_lab_model(50, norm=norm, placement=placement, train_steps=10, **TINY)
    loss, logits = model(IDS, labels=IDS)
    assert logits.shape == (2, 16, 50) and loss.isfinite()
    loss.backward()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    assert model(IDS).isfinite().all()


def test_clipped_softmax_by_hand():
    # two keys, α = 1: γ = -1/2; equal scores: 1.5 · 0.5 - 0.5 = 0.25 each
    torch.testing.assert_close(clipped_softmax(torch.zeros(2), 1.0), torch.tensor([0.25, 0.25]))
    # a clear winner: exactly 1 and exactly 0 (softmax alone gives 1 - 2e-9 and 2e-9)
    out = clipped_softmax(torch.tensor([10.0, -10.0]), 1.0)
    assert out.tolist() == [1.0, 0.0]


def test_mix_ln_is_post_ln_in_the_first_quarter():
    config = LabConfig(50, placement="mix", **(TINY | dict(num_hidden_layers=8)))
    assert [config.post_ln(i) for i in range(8)] == [True, True] + [False] * 6
    assert LabModel(config).norm is not None  # it ends on Pre-LN layers: a final norm
    assert LabModel(LabConfig(50, placement="post", **TINY)).norm is None


def test_post_and_peri_compute_their_definitions():
    torch.manual_seed(0)
    for placement in ("post", "peri"):
        model = build_lab_model(50, placement=placement, **TINY).eval()
        block = model.layers[0]
        x = torch.randn(1, 5, 32)
        cos, sin = model.cos[:5], model.sin[:5]
        if placement == "post":
            h = block.input_layernorm(x + block.self_attn(x, cos, sin))
            want = block.post_attention_layernorm(h + block.mlp(h))
        else:
            h = x + block.attn_output_layernorm(block.self_attn(block.input_layernorm(x), cos, sin))
            want = h + block.mlp_output_layernorm(block.mlp(block.post_attention_layernorm(h)))
        torch.testing.assert_close(block(x, cos, sin), want)


def test_layernorm_scaling_divides_each_pre_norm_by_the_root_of_its_layer():
    model = build_lab_model(50, norm="layernorm", placement="mix", layernorm_scaling=True, **TINY)
    first, last = model.layers[0], model.layers[3]
    assert not isinstance(first.input_layernorm, DepthScaled)  # Post-LN: its output is the stream itself
    assert isinstance(last.input_layernorm, DepthScaled) and last.input_layernorm.depth == 4
    x = torch.randn(3, 32)
    torch.testing.assert_close(last.post_attention_layernorm(x), last.post_attention_layernorm.norm(x) / 2)


def test_embedding_projection_starts_as_the_identity():
    torch.manual_seed(0)
    projected = build_lab_model(50, embedding_projection=True, **TINY)
    assert torch.equal(projected.embed_projection.weight, torch.eye(32))
    plain = build_lab_model(50, **TINY)
    plain.load_state_dict({k: v for k, v in projected.state_dict().items() if "embed_projection" not in k})
    torch.testing.assert_close(projected(IDS), plain(IDS))


def test_a_closed_head_gate_switches_attention_off():
    model = build_lab_model(50, gated_attention=True, **TINY)
    attn = model.layers[0].self_attn
    x = torch.randn(1, 6, 32)
    cos, sin = model.cos[:6], model.sin[:6]
    with torch.no_grad():
        nn.init.zeros_(attn.head_gate.weight)
        half = attn(x, cos, sin)
        attn.head_gate.bias.fill_(-100.0)
        closed = attn(x, cos, sin)
        attn.head_gate = None
        open_ = attn(x, cos, sin)
    torch.testing.assert_close(half, open_ / 2)  # sigmoid(0) = 1/2: linear in the head outputs
    assert closed.abs().max() < 1e-30


def test_bad_configs_are_clear_errors():
    with pytest.raises(LightenError, match="unknown norm 'batchnorm'"):
        LabConfig(50, norm="batchnorm")
    with pytest.raises(LightenError, match="unknown placement 'sandwich'"):
        LabConfig(50, placement="sandwich")
    with pytest.raises(LightenError, match="exceed the model's 8 positions"):
        build_lab_model(50, max_position_embeddings=8, **TINY)(IDS)
