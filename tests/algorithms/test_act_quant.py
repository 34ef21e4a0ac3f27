import pytest
import torch
from tiny_models import sample_text, tiny_model, tiny_tokenizer
from torch import nn

from lighten import formats
from lighten.algorithms.act_quant import calibrate_input_scales, fake_quantize_activation, quantize_inputs
from lighten.algorithms.activations import InputStats, collect_input_stats, token_windows
from lighten.errors import LightenError


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


def test_static_scale_rounds_to_the_fixed_grid_and_saturates():
    s = 0.25
    scales = {"scales": torch.tensor([[s]], dtype=torch.float16)}
    x = torch.tensor([[0.1, -0.13, 3.3, 31.7], [40.0, -100.0, 0.0, 0.124]])
    # round(x / s) clamped to ±127, times s, by hand: 40 and -100 lie beyond ±127 * 0.25 = ±31.75.
    want = torch.tensor([[0.0, -0.25, 3.25, 31.75], [31.75, -31.75, 0.0, 0.0]])
    assert torch.equal(fake_quantize_activation(x, formats.get("int8:tensor"), scales), want)


def test_calibrated_scale_is_the_calibration_absmax_and_larger_inputs_saturate():
    model, tok, texts = tiny_model("llama"), tiny_tokenizer(), [sample_text(300)]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    stats = collect_input_stats(model, tok, texts, n_tokens=100, context=50, names=names)
    absmax = {name: 0.0 for name in names}  # brute force over the same windows
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: absmax.update({name: max(absmax[name], args[0].abs().max().item())})
        )
    with torch.no_grad():
        for window in token_windows(tok, texts, 100, 50):
            model(input_ids=window[None])
    scales = calibrate_input_scales(stats, names)
    for name in names:
        s = scales[name]["scales"].item()
        assert absmax[name] / 127 <= s <= absmax[name] / 127 * (1 + 2**-10)  # stored in fp16, rounded up

    layer = nn.Linear(64, 8)
    quantize_inputs(nn.Sequential(layer), ["0"], "int8:tensor", scales={"0": scales[names[0]]})
    seen = []
    layer.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    s = scales[names[0]]["scales"].float()
    x = torch.linspace(-3, 3, 64)[None] * 127 * s  # up to 3x the calibration range
    with torch.no_grad():
        layer(x)
    assert torch.equal(seen[0], torch.round(x / s).clamp(-127, 127) * s)
    assert (seen[0].abs() == 127 * s).sum() > 40  # everything beyond the calibrated absmax saturates


def test_static_scales_need_a_per_tensor_absmax_format_and_every_name():
    stats = {"a": InputStats.empty(4)}
    with pytest.raises(LightenError, match="per-tensor"):
        calibrate_input_scales(stats, ["a"], "int8:channel")
    with pytest.raises(LightenError, match="no calibration statistics for b"):
        calibrate_input_scales(stats, ["a", "b"])


def test_llm_int8_without_outliers_is_plain_per_token():
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    fmt = formats.get("int8:channel")
    above_all = x.abs().max().item() * 1.01
    assert torch.equal(fake_quantize_activation(x, fmt, outlier_threshold=above_all), fmt.fake_quantize(x))


def test_llm_int8_keeps_outlier_columns_exact_and_cuts_the_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 256, generator=g).clamp(-4, 4)
    x[:, 7] = 100.0  # a huge feature, as LLMs have in a few hidden dimensions
    x[5, 50] = -37.3  # one outlier token makes its whole column an outlier column
    w = formats.get("int8").quantize(torch.randn(64, 256, generator=g) * 0.05).dequantize()
    model = nn.Sequential(nn.Linear(256, 64, bias=False))
    model[0].weight.data = w
    seen = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    ref = x.double() @ w.double().t()  # fp64, with the same int8 weights

    def error(**kwargs):
        handles = quantize_inputs(model, ["0"], "int8:channel", **kwargs)
        with torch.no_grad():
            y = model(x)
        for h in handles:
            h.remove()
        return (y.double() - ref).norm()

    llm_int8_error, plain_error = error(outlier_threshold=6.0), error()
    outliers = [7, 50]
    assert torch.equal(seen[0][:, outliers], x[:, outliers])  # their contribution to y is exact
    rest = torch.ones(256, dtype=torch.bool)
    rest[outliers] = False
    assert not torch.equal(seen[0][:, rest], x[:, rest])  # the rest is int8
    assert not torch.equal(seen[1][:, outliers[1]], x[:, outliers[1]])  # plain per-token quantizes it all
    # Plain per-token int8 steps are 100/127 wide in every token; without the outlier columns they are at most
    # 4/127: the rounding error shrinks ~25x (10x leaves room for how the rounding errors happen to fall).
    assert llm_int8_error * 10 < plain_error
