"""Each packed kernel against the fake-quantized reference F.linear(x_bf16, q.dequantize(bf16)) + b."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lighten import formats
from lighten.algorithms.act_quant import fake_quantize_activation
from lighten.errors import LightenError
from lighten.runtime import linear
from lighten.runtime.linear import (
    DequantLinear,
    GGMLLinear,
    Int4Linear,
    Int8Linear,
    W8A8Linear,
    packed_linear,
)

N, K = 96, 576  # K = 576 is SmolLM2's width: not a whole number of 128-groups, so int4:g128 pads it
SPECS = {  # spec -> the module packed_linear must choose
    "int8": Int8Linear,
    "int4:g32": Int4Linear,
    "int4:g128": Int4Linear,
    "int4:g32:asym": Int4Linear,
    "int4:g128:asym": Int4Linear,
    "nf4": DequantLinear,
    "fp4_e2m1": DequantLinear,
    "mxfp4": DequantLinear,
    "ternary": DequantLinear,
    "int3": DequantLinear,
    "q4_0": GGMLLinear,  # GGUF block types of 32 (576 is not whole 256-blocks)
    "iq4_nl": GGMLLinear,
    "q8_0": GGMLLinear,
}
INPUTS = {"batch 1": (1, K), "batch 32": (32, K), "3-D": (2, 5, K)}
BF16_TOL = 2**-6


def assert_bf16_close(y, ref, x, w, b, extra=0.0):
    """Both sides round their output to bf16 (2^-9 relative each) and multiply with bf16 copies of the weights
    (reference) or of the scales and zero offsets (kernels), another 2^-9 relative on each product. So per
    element |y - ref| is a few 2^-9 of |x| @ |W|^T + |b|, the magnitudes the dot product sums, and in norm
    the errors, uncorrelated across K, average to ~2^-8 of |ref|. 2^-6 leaves 4x headroom and is still far
    below what a wrong code, group, scale or zero-point layout gives (errors the size of the output).
    `extra` adds a known per-element error, e.g. W8A8's activation rounding."""
    assert y.shape == ref.shape
    y, ref = y.float(), ref.float()
    magnitude = x.float().abs() @ w.float().abs().t() + (0 if b is None else b.float().abs())
    assert ((y - ref).abs() <= BF16_TOL * magnitude + extra).all()
    assert (y - ref).norm() <= BF16_TOL * ref.norm() + torch.as_tensor(extra).norm()


def quantized(spec, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[: n // 8] += 0.02  # some rows with a nonzero mean, so asym zero-points are not all 8
    return formats.get(spec).quantize(w), torch.randn(n, generator=g) * 0.1


@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
@pytest.mark.parametrize("spec", SPECS)
def test_kernel_matches_fake_quantized_reference(spec, shape):
    q, b = quantized(spec)
    layer = packed_linear(q, b)
    assert type(layer) is SPECS[spec]
    x = torch.randn(shape)
    w = q.dequantize(torch.bfloat16)
    y = layer(x)
    assert y.dtype == x.dtype  # computed in bf16 (ggml: fp32), returned in the input's dtype
    # ggml rounds x to 8 bits in blocks of 32 (test_ggml_matmul bounds it): |x - x̂| < 0.6 amax / 127.
    extra = ggml_activation_error(x, w) if SPECS[spec] is GGMLLinear else 0.0
    assert_bf16_close(y, F.linear(x.bfloat16(), w, b.bfloat16()), x.bfloat16(), w, b, extra)


def ggml_activation_error(x: torch.Tensor, w: torch.Tensor, block: int = 32) -> torch.Tensor:
    step = x.abs().unflatten(-1, (-1, block)).amax(-1) / 127
    return (0.6 * step.repeat_interleave(block, -1)) @ w.float().abs().t()


@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
def test_w8a8_within_activation_rounding(shape):
    q, b = quantized("int8")
    layer = packed_linear(q, b, mode="w8a8")
    assert type(layer) is W8A8Linear
    x = torch.randn(shape).bfloat16()
    x[..., 0] = 20.0  # an outlier channel, as LLM activations have: coarse per-token steps
    # Fake-quantize each token the way W8A8 does: symmetric int8, one absmax scale per token.
    s = x.float().abs().amax(-1, keepdim=True) / 127
    x_q = torch.round(x.float() / s) * s
    w = q.dequantize(torch.float32)
    y = layer(x)
    # Against the fake-quantized activations the int32 accumulation is exact: only bf16 error is left.
    assert_bf16_close(y, F.linear(x_q, w, b).bfloat16(), x, w, b)
    # Against the bf16 activations add what rounding them moved each output: |x - x_q| @ |W|^T.
    activation_error = (x.float() - x_q).abs() @ w.abs().t()
    assert activation_error.max() > 0.01  # the activation rounding is visible, not lost in bf16 noise
    assert_bf16_close(y, F.linear(x, w.bfloat16(), b.bfloat16()), x, w, b, extra=activation_error)


@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
def test_llm_int8_without_outliers_is_plain_w8a8(shape):
    q, b = quantized("int8")
    x = torch.randn(shape)
    x[..., 0] = 20.0
    plain = packed_linear(q, b, mode="w8a8")(x)
    assert torch.equal(packed_linear(q, b, mode="w8a8", outlier_threshold=20.5)(x), plain)


def llm_int8_input(shape, seed=0):
    """bf16 input with outlier columns 5 (100 in every token) and 200 (-37.3 in one token) and every other
    value within ±127/32: the int8 step of the rest is 1/32, exact in the kernel's fp32 and in fp16."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).clamp(-3.9, 3.9)
    x[..., 1] = 127 / 32
    x[..., 5] = 100.0
    x.view(-1, K)[0, 200] = -37.3
    return x.bfloat16()


@pytest.mark.parametrize("shape", INPUTS.values(), ids=INPUTS.keys())
def test_llm_int8_kernel_matches_simulation_and_keeps_outliers_exact(shape):
    q, b = quantized("int8")
    layer = packed_linear(q, b, mode="w8a8", outlier_threshold=6.0)
    x = llm_int8_input(shape)
    w = q.dequantize(torch.float64)
    # The simulation leaves columns 5 and 200 as they are, so this reference has their contribution exactly.
    x_sim = fake_quantize_activation(x.float(), formats.get("int8:channel"), outlier_threshold=6.0)
    assert torch.equal(x_sim[..., [5, 200]], x.float()[..., [5, 200]])
    y = layer(x)
    assert_bf16_close(y, F.linear(x_sim.double(), w, b.double()), x, w, b)
    # Plain W8A8 steps are 100/127 wide in every token, LLM.int8()'s 1/32: ~25x less activation rounding
    # error. Both outputs also round to bf16 (2^-9 of outputs the outlier products make large): 9-13x here.
    exact = F.linear(x.double(), w, b.double())
    plain = packed_linear(q, b, mode="w8a8")(x)
    assert (y - exact).norm() * 4 < (plain - exact).norm()


def test_outlier_threshold_needs_w8a8():
    with pytest.raises(LightenError, match="needs mode 'w8a8'"):
        packed_linear(quantized("int8")[0], outlier_threshold=6.0)


def test_int4_pads_k_to_whole_groups():
    q, _ = quantized("int4:g128")
    layer = packed_linear(q)
    assert layer.k_padded == 640 and layer.weight.shape == (N, 640 // 2)
    x = torch.randn(4, K)
    ref = F.linear(x.bfloat16(), q.dequantize(torch.bfloat16))
    assert_bf16_close(layer(x), ref.float(), x, q.dequantize(), None)


def test_int8_pads_k_to_a_multiple_of_8():
    q, b = quantized("int8", n=16, k=13)  # unpadded, _weight_int8pack_mm would read past each row
    for layer in (packed_linear(q, b), packed_linear(q, b, mode="w8a8")):
        assert layer.weight.shape == (16, 16)
        x = torch.randn(3, 13).bfloat16()
        w = q.dequantize(torch.bfloat16)
        s = x.float().abs().amax(-1, keepdim=True) / 127
        err = (x.float() - torch.round(x.float() / s) * s).abs() @ w.float().abs().t()
        assert_bf16_close(layer(x), F.linear(x, w, b.bfloat16()), x, w, b, extra=err)


def test_dispatch_falls_back_where_the_kernels_cannot_go():
    assert type(packed_linear(quantized("int4:g16")[0])) is DequantLinear  # group size the kernel lacks
    assert type(packed_linear(quantized("int4:g32", n=40)[0])) is DequantLinear  # N not a multiple of 16
    assert type(packed_linear(quantized("int8:g128")[0])) is DequantLinear
    assert type(packed_linear(quantized("int8:channel:asym")[0])) is DequantLinear
    with pytest.raises(LightenError, match="w8a8 needs int8"):
        packed_linear(quantized("int4:g32")[0], mode="w8a8")


@pytest.mark.parametrize(
    "spec",
    ["nf4", "nf4:dq", "fp4_e2m1", "mxfp4", "fp8_e4m3", "fp6_e3m2", "mxfp6_e2m3", "ternary", "binary",
     "int3", "int3:asym", "int5:g16:asym", "int2:tensor:asym", "int6:channel", "int4:g128:asym"],
)  # fmt: skip
def test_fallback_decodes_block_by_block_exactly(monkeypatch, spec):
    """Blocks cut at byte / dq-block boundaries reproduce q.dequantize() bit for bit, with many blocks."""
    monkeypatch.setattr(linear, "BLOCK_ELEMENTS", 40 * 70)
    q, b = quantized(spec, n=600, k=70)  # 70: rows do not start on a byte for 3/5/6-bit codes and trits
    layer = DequantLinear(q, b)
    assert layer.block < 600 // 3
    blocks = [layer.decode_rows(a, min(a + layer.block, 600)) for a in range(0, 600, layer.block)]
    torch.testing.assert_close(torch.cat(blocks), q.dequantize(), rtol=0, atol=0)
    x = torch.randn(5, 70)
    w = q.dequantize(torch.bfloat16)
    assert_bf16_close(layer(x), F.linear(x.bfloat16(), w, b.bfloat16()), x.bfloat16(), w, b)


@pytest.mark.parametrize("spec", ["q4_k", "q6_k", "iq4_xs"])
def test_gguf_layers_on_rows_of_256_blocks_and_stacked(spec):
    """The 256-weight types (ggml rounds their activations in blocks of 256), and rows stacked as the lean
    decoder joins q/k/v: the joined layer is the layers' outputs side by side."""
    (q, b), (q2, b2) = quantized(spec, n=100, k=256), quantized(spec, n=36, k=256, seed=1)
    layer, other = packed_linear(q, b), packed_linear(q2, b2)
    assert type(layer) is GGMLLinear
    joined = GGMLLinear.stacked([layer, other])
    x = torch.randn(5, 256)
    w = q.dequantize(torch.bfloat16)
    extra = ggml_activation_error(x, w, 256)
    assert_bf16_close(layer(x), F.linear(x.bfloat16(), w, b.bfloat16()), x.bfloat16(), w, b, extra)
    assert torch.equal(joined(x), torch.cat([layer(x), other(x)], -1))


def test_gguf_layers_hold_their_weight_once_and_copies_share_it():
    q, b = quantized("q4_0")
    layer = packed_linear(q, b)
    assert list(layer.buffers()) == [] and layer.nbytes == q.nbytes  # ggml holds the one copy
    x = torch.randn(3, K)
    twin = copy.deepcopy(layer)
    assert twin.product.matrices[0] is layer.product.matrices[0]  # immutable: shared, not copied
    assert torch.equal(twin(x), layer(x))


def test_gguf_layers_of_different_types_stack():
    (q, b), (q2, b2) = quantized("q4_0"), quantized("q8_0", n=40, seed=1)
    parts = [packed_linear(q, b), packed_linear(q2, b2)]
    joined = GGMLLinear.stacked(parts)
    x = torch.randn(2, 3, K)
    assert joined.spec == "q4_0+q8_0" and joined.out_features == N + 40
    assert torch.equal(joined(x), torch.cat([p(x) for p in parts], -1))
    assert not GGMLLinear.can_stack([parts[0], packed_linear(quantized("q4_0", k=64)[0])])


@pytest.mark.parametrize("spec", ["int8", "int4:g32:asym", "nf4", "q4_0"])
def test_packed_buffers_are_integers_that_survive_model_to(spec):
    q, b = quantized(spec)
    layer = packed_linear(q, b)
    x = torch.randn(3, K)
    before = layer(x)
    layer.to(torch.float16)  # casts every floating tensor: only the bias may change
    assert all(not t.is_floating_point() for t in layer.buffers())
    torch.testing.assert_close(layer(x), before, rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("spec", ["int8", "int4:g32", "int4:g64:asym"])
def test_stacked_layers_are_the_stacked_weight_packed(spec):
    """Stacking packed rows gives the layer packing the stacked weight gives: those formats' scales are per
    row, so quantizing [W1; W2] quantizes W1 and W2 separately."""
    fmt, w, b = formats.get(spec), torch.randn(192, K), torch.randn(192)
    parts = [packed_linear(fmt.quantize(w[:64]), b[:64]), packed_linear(fmt.quantize(w[64:]), b[64:])]
    joined = type(parts[0]).stacked(parts)
    whole = packed_linear(fmt.quantize(w), b)
    assert type(joined) is type(whole) and joined.out_features == 192
    assert joined.state_dict().keys() == whole.state_dict().keys()
    assert all(torch.equal(t, whole.state_dict()[name]) for name, t in joined.state_dict().items())
    assert not Int4Linear.can_stack([packed_linear(quantized("int4:g32", n=32)[0])] * 2)  # half a row block
    with pytest.raises(LightenError, match="cannot be stacked"):
        DequantLinear.stacked([packed_linear(quantized("nf4")[0])] * 2)


def test_fallback_holds_the_quantized_tensor_as_stored():
    q, b = quantized("nf4:dq")
    held = DequantLinear(q, b).quantized()
    assert held.spec == q.spec and held.shape == q.shape
    for name, t in q.tensors.items():
        assert held.tensors[name].dtype == t.dtype and torch.equal(held.tensors[name], t)


def test_gguf_layers_compose_with_torch_compile():
    """ggml's matmul is a torch op (lighten::ggml_matmul): torch.compile traces a model through it in one
    graph (fullgraph: no break at the ctypes call), its fake giving the output shape, and computes what
    eager does."""
    q, b = quantized("q4_0")
    model = torch.nn.Sequential(torch.nn.Linear(K, K), packed_linear(q, b), torch.nn.GELU())
    x = torch.randn(4, K)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), model(x))
