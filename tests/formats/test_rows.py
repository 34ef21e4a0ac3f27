"""The formats' storage API (codes, zero_points, scale_zero, row_slice) against the stored tensor's own
dequantize and against the grammar: whatever reads a QuantizedTensor outside formats/ goes through these."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_properties import FORMATS, groups

from lighten.errors import SpecError
from lighten.formats import get
from lighten.formats.format import fp16_ceil

EXAMPLES = settings(max_examples=20, deadline=None)


@st.composite
def rows_and_cut(draw, spec):
    """A weight (rows, K) with K often not a whole number of groups or bytes, and rows a:b on the format's
    row alignment (b may be the last row)."""
    fmt = get(spec)
    k = draw(st.one_of(st.integers(1, 130), st.just(70)))
    rows = draw(st.integers(1, 300))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(rows, k, generator=g) * 10.0 ** draw(st.integers(-2, 1))
    if draw(st.booleans()):
        x[: rows // 3] += x.abs().mean()  # rows with a nonzero mean: asym zero-points away from the middle
    align = fmt.row_align((rows, k))
    a = draw(st.sampled_from(range(0, rows, align)))
    ends = [*range(a + align, rows, align), rows]
    return x, a, draw(st.sampled_from(ends))


@pytest.mark.parametrize("spec", FORMATS)
@EXAMPLES
@given(data=st.data())
def test_row_slice_is_those_rows_of_the_tensor(spec, data):
    x, a, b = data.draw(rows_and_cut(spec))
    fmt = get(spec)
    q = fmt.quantize(x)
    part = q.rows(a, b)
    assert part.spec == q.spec and part.shape == (b - a, x.shape[1])
    assert torch.equal(part.dequantize(), q.dequantize()[a:b])
    assert torch.equal(fmt.codes(part), fmt.codes(q)[a:b])
    if fmt.granularity != "tensor":
        for got, want in zip(fmt.scale_zero(part), fmt.scale_zero(q), strict=True):
            assert torch.equal(got, want[a:b])
    # A valid stored tensor of its shape, made of views of q's buffers (no copy).
    assert {n: (t.dtype, tuple(t.shape)) for n, t in part.tensors.items()} == fmt.layout(part.shape)
    for name, t in part.tensors.items():
        assert t.untyped_storage().data_ptr() == q.tensors[name].untyped_storage().data_ptr()


@pytest.mark.parametrize("spec", [s for s in FORMATS if s.startswith("int")])
@EXAMPLES
@given(data=st.data())
def test_integer_codes_and_zero_points_give_the_weights(spec, data):
    """x_hat = (code - zero) * scale per group, the codes read as the grammar says: b-bit two's complement
    for sym, unsigned with an integer zero-point for asym."""
    x, _, _ = data.draw(rows_and_cut(spec))
    fmt, (rows, k) = get(spec), x.shape
    q = fmt.quantize(x)
    bits = fmt.element.bits
    codes = fmt.codes(q).double()
    assert codes.shape == (rows, k) and codes.max() < 2**bits
    ids, (g_rows, per_row) = groups(fmt, x.shape)
    scale = q.tensors["scales"].double().reshape(-1)[ids].view(rows, k)
    if fmt.asym:
        zeros = fmt.zero_points(q)
        assert zeros.shape == (g_rows, per_row) and zeros.dtype == torch.uint8
        values = codes - zeros.double().reshape(-1)[ids].view(rows, k)
    else:
        values = torch.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
    assert torch.equal((values * scale).float(), q.dequantize())


def test_table_decoded_values_dequantize_like_the_codec():
    fmt = get("nf4:dq")
    q = fmt.quantize(torch.randn(300, 70))
    values = fmt.element.decode(fmt.codes(q))  # any decoder that gives the element values
    assert torch.equal(fmt.dequantize_values(q, values), q.dequantize())


def test_rows_off_the_alignment_are_refused():
    fmt = get("int3")  # rows of 70 3-bit codes: a row starts on a byte every 4 rows
    q = fmt.quantize(torch.randn(10, 70))
    assert fmt.row_align(q.shape) == 4
    assert q.rows(4, 10).shape == (6, 70) and q.rows(0, 8).shape == (8, 70)
    for a, b in [(1, 4), (0, 5), (4, 4), (8, 11), (-4, 4)]:
        with pytest.raises(ValueError, match="multiples of 4"):
            q.rows(a, b)


def test_zero_points_only_for_asym_and_own_format_only():
    q = get("int4").quantize(torch.randn(4, 64))
    with pytest.raises(SpecError, match="no zero-points"):
        get("int4").zero_points(q)
    with pytest.raises(SpecError, match="passed to int8"):
        get("int8").codes(q)


def test_scale_buffers_are_what_quantize_takes():
    fmt = get("nf4:dq")
    x = torch.randn(8, 200)
    q = fmt.quantize(x)
    assert set(q.scale_buffers()) == set(fmt.layout(x.shape)) - {"codes"}
    assert torch.equal(fmt.quantize(x, scales=q.scale_buffers()).tensors["codes"], q.tensors["codes"])


@settings(max_examples=200, deadline=None)
@given(s=st.floats(0, 65504, width=32))
def test_fp16_ceil_is_the_smallest_fp16_at_least_s(s):
    h = np.float16(s)
    want = np.nextafter(h, np.float16(np.inf)) if np.float32(h) < np.float32(s) else h
    got = fp16_ceil(torch.tensor([s], dtype=torch.float32))
    assert got.dtype == torch.float16 and got.item() == float(want)
