"""Kernel dispatch (lighten.runtime.dispatch): lighten's ints that ggml computes exactly go to whichever
kernel is measured faster on this host, measured once and remembered; forced either way, the packed model
computes the same layers."""

import copy
import json

import pytest
import torch
from tiny_models import tiny_model

from lighten.errors import LightenError
from lighten.plan import make_plan
from lighten.quantize import quantize_weights
from lighten.runtime import dispatch, pack_model
from lighten.runtime.decode import Decoder
from lighten.runtime.dispatch import choose_kernels
from lighten.runtime.ggml import GGMLFunction
from lighten.runtime.linear import GGMLLinear, Int8Linear


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTEN_CACHE", str(tmp_path))


def test_forced_choices():
    weights = [
        ("int8", (64, 96)),
        ("int4:g32", (64, 64)),
        ("int4:g32", (64, 48)),  # not whole blocks of 32: int4:g32 stays on torch's kernel for all its layers
        ("q4_0", (32, 64)),  # already a GGUF type
        ("nf4", (64, 64)),  # no GGUF type holds its numbers
    ]
    assert choose_kernels(weights, "torch") == {}
    assert choose_kernels(weights, "ggml") == {"int8:channel:sym": "q8_0"}
    with pytest.raises(LightenError, match="kernels is one of auto, torch, ggml"):
        choose_kernels(weights, "fast")


def test_auto_measures_each_format_once_on_its_main_shape(monkeypatch, tmp_path):
    calls = []

    def measure(spec, shape):
        calls.append((spec, shape))
        return {"torch_ms": 1.0, "ggml_ms": 0.5 if spec.startswith("int8") else 2.0}

    monkeypatch.setattr(dispatch, "_measure", measure)
    weights = [("int8", (64, 96)), ("int8", (256, 96)), ("int4:g32", (64, 64))]
    assert choose_kernels(weights) == {"int8:channel:sym": "q8_0"}  # ggml faster for int8 only
    assert calls == [("int8:channel:sym", (256, 96)), ("int4:g32:sym", (64, 64))]
    assert choose_kernels(weights) == {"int8:channel:sym": "q8_0"} and len(calls) == 2  # remembered
    remembered = json.loads((tmp_path / "kernels.json").read_text())
    assert len(remembered) == 2 and all(key.endswith("256x96") or key.endswith("64x64") for key in remembered)


def test_the_measurement_times_both_kernels():
    times = dispatch._measure("int4:g32:sym", (64, 128))
    assert set(times) == {"torch_ms", "ggml_ms"} and all(t > 0 for t in times.values())


def test_a_model_on_either_kernel_computes_the_same_layers():
    model = tiny_model(
        "llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256
    )
    quantized = quantize_weights(model, make_plan(model, "int8"))
    ids = torch.tensor([[5, 17, 9, 3, 44, 2, 8]])
    with torch.no_grad():
        want = model(ids).logits[0, -1]  # fp32, unquantized
        on_torch = pack_model(copy.deepcopy(model), quantized, kernels="torch")
        on_ggml = pack_model(copy.deepcopy(model), quantized, kernels="ggml")
        layers = [m for m in on_ggml.modules() if isinstance(m, GGMLLinear)]
        assert len(layers) == 14 and not any(isinstance(m, Int8Linear) for m in on_ggml.modules())
        assert layers[0].kernel().startswith("int8:channel:sym as q8_0: ggml")
        assert on_ggml.model.embed_tokens.weight.dtype == torch.float32  # ggml's kernels take fp32
        assert isinstance(Decoder(on_ggml, 16).blocks[0].rest, GGMLFunction)  # the whole block on ggml
        errors = [
            ((m(ids).logits[0, -1].float() - want).norm() / want.norm()).item() for m in (on_torch, on_ggml)
        ]
    # The same int8 weights; torch's kernel rounds activations to bf16 (and its scales to bf16), ggml's to 8
    # bits per block of 32: each within 2% of the fp32 model here.
    assert max(errors) < 0.02, errors  # measured 0.012 both
