"""Properties of every format, checked against the definitions rather than the code:
each test re-derives the group, the scale rule and the element grid from the spec text."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lighten.formats import QuantizedTensor, get, list_formats
from lighten.formats.format import ELEMENTS, UNSIGNED
from lighten.formats.spec import GGML  # GGUF block types: tests/formats/test_ggml.py

NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933235474, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float64)  # fmt: skip
MINI = {  # (exponent bits, mantissa bits, bias, max) from the OCP definitions
    "fp8_e4m3": (4, 3, 7, 448.0),
    "fp8_e5m2": (5, 2, 15, 57344.0),
    "fp6_e3m2": (3, 2, 3, 28.0),
    "fp6_e2m3": (2, 3, 1, 7.5),
    "fp4_e2m1": (2, 1, 1, 6.0),
}
MX = {  # element, emax of the element (OCP MX v1.0 table)
    "mxfp8_e4m3": ("fp8_e4m3", 8),
    "mxfp8_e5m2": ("fp8_e5m2", 15),
    "mxfp6_e3m2": ("fp6_e3m2", 4),
    "mxfp6_e2m3": ("fp6_e2m3", 2),
    "mxfp4": ("fp4_e2m1", 2),
    "mxint8": ("int8", 0),
}
FORMATS = [f.name for f in list_formats() if f.family not in GGML] + [
    "int4:g32:asym", "int8:channel:asym", "int2:g128:asym", "int3:tensor", "int5:g7",
    "fp8_e4m3:g128", "fp4_e2m1:channel", "fp6_e3m2:tensor", "nf4:dq", "nf4:channel",
    "ternary:channel", "ternary:g64", "binary:g32", "binary:tensor",
]  # fmt: skip
FP16_TINY = 2.0**-24  # smallest fp16 subnormal
EXAMPLES = settings(max_examples=30, deadline=None)


@st.composite
def weights(draw):
    k = draw(st.one_of(st.integers(1, 200), st.just(576)))
    shape = draw(st.sampled_from([(k,), (2, k), (2, 2, k)]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    # magnitudes 1e-3..1e4: inside the fp16 scale range (saturation is tested separately)
    x = torch.randn(shape, generator=g) * 10.0 ** draw(st.integers(-3, 2))
    if draw(st.booleans()):  # zero runs: all-zero groups and rows
        x[..., : draw(st.integers(0, k))] = 0
    if draw(st.booleans()):  # an outlier
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] *= 100
    if draw(st.booleans()):  # land on round numbers: exact ties of int grids
        x = torch.round(x * 4) / 4
    return x


def groups(fmt, shape):
    """Group index of every element (row-major) and (rows, groups per row), from the grammar."""
    n, k = math.prod(shape), shape[-1]
    if fmt.granularity == "tensor":
        return torch.zeros(n, dtype=torch.long), (1, 1)
    row, col = torch.arange(n) // k, torch.arange(n) % k
    size = k if fmt.granularity == "channel" else int(fmt.granularity[1:])
    per_row = -(-k // size)
    return row * per_row + col // size, (n // k, per_row)


def reduce(values, ids, count, how):
    return torch.zeros(count, dtype=values.dtype).scatter_reduce(0, ids, values, how, include_self=False)


def half_spacing(v, e_bits, m_bits, bias):
    """Half the distance between neighbouring minifloat values around v (subnormals included)."""
    binade = np.frexp(np.abs(v.numpy()))[1] - 1
    return torch.from_numpy(np.ldexp(0.5, np.maximum(binade, 1 - bias) - m_bits))


def check_values(fmt, x, x_hat, tensors):
    ids, (rows, per_row) = groups(fmt, x.shape)
    assert tensors["scales"].shape == (rows, per_row)
    n_groups = rows * per_row
    x, x_hat = x.reshape(-1).double(), x_hat.reshape(-1).double()
    assert x_hat.isfinite().all()
    err = (x - x_hat).abs()
    absmax = reduce(x.abs(), ids, n_groups, "amax")[ids]
    scale = tensors["scales"].reshape(-1).double()[ids]
    fam = fmt.family

    if fam in MX:
        elem, emax = MX[fam]
        exp = np.frexp(absmax.numpy())[1] - 1 - emax
        x_exp = torch.from_numpy(np.where(absmax.numpy() == 0, -127, np.clip(exp, -127, 127)))
        assert torch.equal(tensors["scales"].reshape(-1).long()[ids], x_exp + 127)
        v = x / 2.0**x_exp
        if elem == "int8":
            step, top = torch.full_like(v, 2.0**-7), 127 / 64
        else:
            e, m, b, top = MINI[elem]
            step = half_spacing(v, e, m, b)
        assert (err <= 2.0**x_exp * torch.maximum(step, v.abs() - top) * (1 + 1e-9)).all()
    elif fam in MINI or (fam.startswith("int") and not fmt.asym):
        top = MINI[fam][3] if fam in MINI else 2 ** (int(fam[3:]) - 1) - 1
        # fp16 scale, rounded up: absmax / top <= scale <= that * (1 + 2^-10)
        assert (scale >= absmax / top * (1 - 1e-6)).all()
        assert (scale <= absmax / top * (1 + 2**-10) + FP16_TINY).all()
        half = half_spacing(x / scale, *MINI[fam][:3]) if fam in MINI else 0.5
        assert (err <= scale * half * (1 + 1e-5)).all()
    elif fam.startswith("int"):  # asym
        top = 2 ** int(fam[3:]) - 1
        span = reduce(x, ids, n_groups, "amax").clamp(min=0) - reduce(x, ids, n_groups, "amin").clamp(max=0)
        assert (scale >= span[ids] / top * (1 - 1e-6)).all()
        assert (scale <= span[ids] / top * (1 + 2**-10) + FP16_TINY).all()
        assert (err <= scale * (0.5 + 1e-4)).all()
        assert (x_hat[x == 0] == 0).all()  # zero is on the grid
    elif fam == "nf4":
        slack = 1e-6 * scale.abs()
        if fmt.dq:  # documented layout: int8 code * per-256 fp32 scale + mean
            codes = tensors["scales"].view(torch.int8).reshape(-1).double()
            block_scale = tensors["scales_scale"].double().repeat_interleave(256)[: codes.numel()]
            mean = tensors["scales_mean"].double()
            scale = (codes * block_scale + mean)[ids]
            # fp32 rounding of code * scale + mean, which the oracle does in fp64
            slack = 1e-6 * (mean.abs() + 127 * block_scale[ids])
            assert (scale >= absmax - slack).all()  # ceil: never below the true absmax
        else:
            assert torch.equal(scale, absmax)  # fp32 absmax, stored exactly
        nearest = (x[:, None] - NF4 * scale[:, None]).abs().min(-1).values
        assert (err <= nearest + slack).all()
    else:  # ternary, binary: absmean, nearest fp16
        mean = (reduce(x.abs(), ids, n_groups, "sum") / reduce(torch.ones_like(x), ids, n_groups, "sum"))[ids]
        assert ((scale - mean).abs() <= mean * (2**-11 + 1e-5) + 2**-25).all()
        if fam == "binary":
            assert torch.equal(x_hat, torch.where(x < 0, -scale, scale))
        else:
            inside = x.abs() <= 1.5 * scale * (1 - 1e-5)
            outside = x.abs() >= 1.5 * scale * (1 + 1e-5)
            assert (err[inside] <= scale[inside] / 2 * (1 + 1e-5)).all()
            assert torch.equal(x_hat[outside], (torch.sign(x) * scale)[outside])


def check_storage(fmt, x, q):
    assert q.spec == fmt.name and q.shape == tuple(x.shape)
    n = x.numel()
    bits = fmt.element.bits
    assert q.tensors["codes"].numel() == ((n + 4) // 5 if fmt.family == "ternary" else -(-n * int(bits) // 8))
    for t in q.tensors.values():
        assert t.is_contiguous()
    assert q.nbytes == sum(t.numel() * t.element_size() for t in q.tensors.values())
    back = QuantizedTensor.from_tensors(q.spec, q.shape, dict(q.tensors))
    assert torch.equal(back.dequantize(), q.dequantize())


@pytest.mark.parametrize("spec", FORMATS)
@EXAMPLES
@given(x=weights())
def test_format_properties(spec, x):
    fmt = get(spec)
    q = fmt.quantize(x)
    check_storage(fmt, x, q)
    x_hat = q.dequantize()
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    assert torch.equal(fmt.dequantize(q), x_hat)
    check_values(fmt, x, x_hat, q.tensors)
    for dtype in (torch.float32, torch.bfloat16):
        y = fmt.fake_quantize(x.to(dtype))
        assert y.shape == x.shape and y.dtype == dtype
    # fake_quantize skips the packing, and must not skip anything else
    assert torch.equal(fmt.fake_quantize(x), x_hat)


@pytest.mark.parametrize("spec", FORMATS)
def test_all_zero_and_huge(spec):
    fmt = get(spec)
    for shape in [(1,), (3, 576), (2, 3, 40)]:
        assert torch.equal(fmt.fake_quantize(torch.zeros(shape)), torch.zeros(shape))
    # beyond the fp16 scale range (65504 * max_value): saturates, never inf/NaN
    y = fmt.fake_quantize(torch.tensor([[1e9, -1e9, 1.0, 0.0]] * 2))
    assert y.isfinite().all()
    if not fmt.asym:  # an asym grid capped at fp16 cannot span both signs of 1e9
        assert y[0, 0] > 0 and y[0, 1] < 0


@pytest.mark.parametrize("name, element", [*ELEMENTS.items(), *(("u" + k, v) for k, v in UNSIGNED.items())])
def test_element_codes_round_trip_and_saturate(name, element):
    n_codes = 3 if name == "ternary" else 2 ** int(element.bits)
    codes = torch.arange(n_codes, dtype=torch.uint8)
    values = element.decode(codes)
    valid = values.abs() <= element.max_value  # drops NaN/inf and int's unused -2^(b-1)
    assert torch.equal(element.encode(values[valid]), codes[valid])
    assert values[valid].unique().numel() == element.levels
    big = element.decode(element.encode(torch.tensor([1e30, math.inf, -1e30, -math.inf])))
    assert big[:2].tolist() == [element.max_value] * 2
    assert big[2:].tolist() == [0.0 if name.startswith("u") else -element.max_value] * 2
