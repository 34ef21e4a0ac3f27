"""Per-weight sensitivity probes on tiny random models (values are "random"; only their order is tested), and
the imatrix estimate's formula by hand."""

import pytest
import scipy.stats
import torch
from gguf import GGMLQuantizationType, quants
from tiny_models import sample_text, tiny_model, tiny_tokenizer
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten.algorithms.sensitivity import (
    hessian_trace_sensitivity,
    imatrix_sensitivity,
    input_importance,
    layer_sensitivity,
)
from lighten.errors import LightenError
from lighten.plan import make_plan

TEXTS = [sample_text(400)]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_int8_is_less_sensitive_than_int2_and_weights_are_restored(arch):
    # A wider init than the default 0.02 makes attention depend on q/k, so every weight has a signal above
    # fp32 noise (at 0.02 the tiny model's attention is nearly uniform whatever q and k are).
    model = tiny_model(arch, initializer_range=0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = make_plan(model, "int8")
    s = layer_sensitivity(model, tiny_tokenizer(), TEXTS, {n: ["int8", "int2:g32"] for n in plan}, 96, 48)
    assert set(s) == {(n, spec) for n in plan for spec in ("int8", "int2:g32")}
    for name in plan:
        if name.startswith("pooler."):  # BERT's pooler does not feed the last hidden state
            assert s[name, "int8"] == s[name, "int2:g32"] == 0
        else:
            assert s[name, "int8"] < s[name, "int2:g32"], name
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_transposed_conv1d_weights_are_probed_and_restored():
    model = tiny_model("gpt2", initializer_range=0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = "transformer.h.0.mlp.c_fc.weight"
    s = layer_sensitivity(model, tiny_tokenizer(), TEXTS, {name: ["int8", "int2:g32"]}, 64, 64)
    assert 0 < s[name, "int8"] < s[name, "int2:g32"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_hessian_trace_proxy_ranks_like_the_measurement(arch):
    """The HAWQ proxy is a second-order estimate of the same divergence: same order, same magnitude."""
    model = tiny_model(arch, initializer_range=0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidates = {n: ["int8", "int4:g32", "int2:g32"] for n in make_plan(model, "int8") if "pooler" not in n}
    measured = layer_sensitivity(model, tiny_tokenizer(), TEXTS, candidates, 96, 48)
    proxy = hessian_trace_sensitivity(model, tiny_tokenizer(), TEXTS, candidates, 96, 48, samples=2)
    keys = list(measured)
    assert scipy.stats.spearmanr([measured[k] for k in keys], [proxy[k] for k in keys]).statistic > 0.9
    int8 = [proxy[k] / measured[k] for k in keys if k[1] == "int8"]  # small errors: Taylor holds
    assert 0.3 < sorted(int8)[len(int8) // 2] < 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_imatrix_sensitivity_is_the_importance_weighted_squared_error_by_hand():
    """sum_j importance_j sum_i (W - Q(W))^2_ij, with Q gguf's own quantizer (lighten's q4_0 / q8_0 without
    importance are gguf's byte for byte) and the sum written out, for a Linear and a transposed Conv1D."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"linear": nn.Linear(64, 3, bias=False), "conv": Conv1D(3, 64)})
    nn.init.normal_(model["conv"].weight)  # Conv1D starts at N(0, 0.02); any values will do
    importance = torch.rand(64) * torch.tensor([1.0, 100.0]).repeat(32)  # columns that matter unequally
    weights = {  # [out, in]
        "linear.weight": model["linear"].weight.detach(),
        "conv.weight": model["conv"].weight.detach().t(),
    }
    costs = imatrix_sensitivity(
        model, dict.fromkeys(weights, ["q4_0", "q8_0"]), dict.fromkeys(weights, importance)
    )
    for name, w in weights.items():
        for spec in ("q4_0", "q8_0"):
            kind = GGMLQuantizationType[spec.upper()]
            q = quants.dequantize(quants.quantize(w.numpy(), kind), kind)
            expected = 0.0
            for i in range(3):
                for j in range(64):
                    expected += float(importance[j]) * (float(w[i, j]) - float(q[i, j])) ** 2
            assert costs[name, spec] == pytest.approx(expected, rel=1e-9), (name, spec)
    assert all(costs[name, "q8_0"] < costs[name, "q4_0"] for name in weights)


def test_importance_is_the_mean_square_of_each_input_and_embeddings_have_none():
    model = tiny_model("llama")
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight"]
    inputs = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    importance = input_importance(model, tiny_tokenizer(), TEXTS, names, 96, 48)
    hook.remove()
    x = torch.cat([a.reshape(-1, a.shape[-1]) for a in inputs])
    assert list(importance) == names[1:]
    torch.testing.assert_close(importance[names[1]], x.square().mean(0))
    with pytest.raises(LightenError, match="model.embed_tokens.weight is none .an embedding table.: use"):
        imatrix_sensitivity(model, {name: ["q8_0", "q4_0"] for name in names}, importance)
