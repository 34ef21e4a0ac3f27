"""Round-to-nearest quantization of a whole model's planned weights."""

import pytest
import torch
from tiny_models import tiny_model

from lighten import formats
from lighten.plan import make_plan
from lighten.quantize import dequantize_weight, quantize_weights


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
def test_quantize_weights_matches_fake_quantize_of_each_weight(arch):
    """The [out, in] orientation matters for GPT-2's transposed Conv1D: groups must run along inputs."""
    model = tiny_model(arch)
    plan = make_plan(model, "int4:g16")
    quantized = quantize_weights(model, plan)
    fmt = formats.get("int4:g16")
    for name, q in quantized.items():
        w = model.get_parameter(name).detach()
        as_out_in = w.t() if arch == "gpt2" else w
        assert q.shape == tuple(as_out_in.shape)
        torch.testing.assert_close(
            dequantize_weight(model, name, q), _orient(fmt.fake_quantize(as_out_in), arch), rtol=0, atol=0
        )


def _orient(w, arch):
    return w.t() if arch == "gpt2" else w
