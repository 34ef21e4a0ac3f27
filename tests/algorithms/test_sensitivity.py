"""Per-weight sensitivity probes on tiny random models (values are "random"; only their order is tested)."""

import pytest
import scipy.stats
import torch
from tiny_models import sample_text, tiny_model, tiny_tokenizer

from lighten.algorithms.sensitivity import hessian_trace_sensitivity, layer_sensitivity
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
