import torch
from tiny_models import tiny_model

from lighten.algorithms.act_quant import quantize_inputs


def test_inputs_are_quantized_per_token_and_hooks_come_off():
    model = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    q.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    ids = torch.tensor([[4, 5, 6, 7]])
    handles = quantize_inputs(model, ["model.layers.0.self_attn.q_proj"], "int8:channel")
    with torch.no_grad():
        model(ids)
        x = seen[-1]
        # Each token row sits on its own 255-level grid: absmax / 127 * integer.
        step = x.abs().amax(-1, keepdim=True) / 127
        codes = x / step
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        for h in handles:
            h.remove()
        model(ids)
    assert not torch.allclose(seen[-1] / step, (seen[-1] / step).round(), atol=1e-3)
