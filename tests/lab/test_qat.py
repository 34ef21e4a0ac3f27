"""QAT: the forward computes with the zoo's fake-quantized weights and activations, the backward passes the
gradient straight through, and the modules go back to plain nn.Linear with the trained parameters."""

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

from lighten import formats
from lighten.errors import LightenError
from lighten.lab.qat import BITNET, QATLinear, plain_linears, prepare_qat, straight_through


def test_straight_through_forwards_the_quantized_and_backwards_the_identity():
    x = torch.tensor([0.2, 0.7, -1.4], requires_grad=True)
    y = straight_through(x, x.detach().round())
    assert torch.equal(y, torch.tensor([0.0, 1.0, -1.0]))
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_bitnet_linear_by_hand():
    """Absmean ternary: mean |W| = 0.5, so W / 0.5 rounds to [[1, 0], [-1, 1]]. The input [1, -2] to int8
    per token: scale 2 / 127 = 0.015748 rounded up to the next fp16, 1033 · 2^-16 = 0.0157623, so 1 is
    round(63.44) = 63 steps and -2 is -127 steps."""
    linear = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.6, 0.1], [-0.7, 0.6]]))
    qat = QATLinear(linear, *BITNET)
    x = torch.tensor([[1.0, -2.0]])
    w = torch.tensor([[1.0, 0.0], [-1.0, 1.0]]) * 0.5
    step = 1033 * 2**-16
    xq = torch.tensor([[63 * step, -127 * step]])
    torch.testing.assert_close(qat(x), xq @ w.T)
    assert qat.weight is linear.weight  # shared, not copied


@pytest.mark.parametrize("spec", ["int4:g32", "int8:channel", "ternary", "nf4"])
def test_forward_is_the_zoo_format_and_gradients_reach_the_weights(spec):
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    qat = QATLinear(linear, spec)
    x = torch.randn(3, 64)
    want = nn.functional.linear(x, formats.get(spec).fake_quantize(linear.weight.detach()), linear.bias)
    y = qat(x)
    torch.testing.assert_close(y, want)
    y.sum().backward()
    # straight through: dL/dW as for the plain product with the quantized weight
    torch.testing.assert_close(linear.weight.grad, torch.ones(3, 8).T @ x)


def test_prepare_trains_and_goes_back_to_plain_linears():
    model = tiny_model("llama")
    names = prepare_qat(model, "int4:g32", activations="int8:channel")
    assert len(names) == 14 and "lm_head" not in names  # 7 per block, not the output head
    assert isinstance(model.model.layers[0].self_attn.q_proj, QATLinear)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    ids = torch.randint(4, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    plain_linears(model)
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(LightenError, match="Conv1D"):
        prepare_qat(tiny_model("gpt2"), "int4:g32", names=["transformer.h.0.attn.c_attn"])
