"""Element codecs: how one already-scaled value becomes a uint8 code and back.

Every format in the zoo is "element codes x per-group scale"; this file is the element half.
encode() rounds to nearest (ties to even) and saturates at ±max_value, never producing
inf/NaN; decode() is exact (every code's value is representable in fp32).
"""

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch


class Element(NamedTuple):
    bits: float  # storage bits per code: 1.6 for trits (5 per byte)
    max_value: float  # largest magnitude encode() can produce
    levels: int  # distinct values encode() can produce
    encode: Callable[[torch.Tensor], torch.Tensor]  # fp32 values -> uint8 codes
    decode: Callable[[torch.Tensor], torch.Tensor]  # uint8 codes -> fp32 values


# ---- integers -------------------------------------------------------------------------------
# Signed codes are b-bit two's complement (int8 codes are literally int8 bytes). The range is
# symmetric, [-(2^(b-1)-1), 2^(b-1)-1]: absmax scaling maps the group onto ±qmax, so the extra
# code -2^(b-1) could only serve one sign and would go unused; a symmetric grid also keeps
# quantize(-x) == -quantize(x). int4 therefore has 15 levels, int2 has 3 ({-1, 0, 1}).


def _int_encode(v, bits, step):
    qmax = 2 ** (bits - 1) - 1
    q = torch.round(v / step).clamp(-qmax, qmax).to(torch.int16)
    return (q & (2**bits - 1)).to(torch.uint8)


def _int_decode(c, bits, step):
    c = c.to(torch.int16)
    return (c - (c >> (bits - 1) << bits)).float() * step  # sign-extend from bit b-1


def integer(bits: int, step: float = 1.0) -> Element:
    """Signed b-bit integer times `step` (MX int8 elements have an implicit step of 2^-6)."""
    qmax = 2 ** (bits - 1) - 1
    kw = {"bits": bits, "step": step}
    return Element(bits, qmax * step, 2 * qmax + 1, partial(_int_encode, **kw), partial(_int_decode, **kw))


def unsigned(bits: int) -> Element:
    """Codes 0..2^b-1 for asymmetric formats: the zero-point is added before encode()."""
    top = 2**bits - 1

    def encode(v):
        return torch.round(v).clamp(0, top).to(torch.uint8)

    return Element(bits, float(top), top + 1, encode, lambda c: c.float())


# ---- minifloats -----------------------------------------------------------------------------
# One codec for every sign|exponent|mantissa format. Codes are monotone in magnitude, and a
# value with binade exponent e (clamped to emin = 1 - bias, where subnormals share emin's
# spacing) and integer significand q (hidden bit included, so q < 2^(m+1)) has magnitude code
# (e - emin) * 2^m + q. That one formula covers normals, subnormals (q < 2^m lands in exponent
# field 0) and a rounding carry into the next binade (q == 2^(m+1)).


def _mf_encode(v, e_bits, m_bits, bias, max_value):
    a = v.abs().clamp(max=max_value)  # saturate: no overflow to inf/NaN
    emin = 1 - bias
    e = torch.frexp(a.clamp(min=2.0**emin)).exponent - 1  # floor(log2 a) >= emin; frexp is exact
    q = torch.round(torch.ldexp(a, m_bits - e))  # torch.round is round-half-to-even
    mag = (e - emin) * 2**m_bits + q.to(torch.int32)
    return (mag | (torch.signbit(v).to(torch.int32) << (e_bits + m_bits))).to(torch.uint8)


def _mf_decode(c, e_bits, m_bits, bias, max_value):
    c = c.to(torch.int32)
    e = (c >> m_bits) & (2**e_bits - 1)
    m = c & (2**m_bits - 1)
    q = torch.where(e > 0, m + 2**m_bits, m)
    a = torch.ldexp(q.float(), e.clamp(min=1) - bias - m_bits)
    # Codes above max_value are e5m2's IEEE inf (mantissa 0) / NaN and e4m3fn's one NaN
    # (S.1111.111); fp6/fp4 have none.
    a = torch.where(a > max_value, torch.where(m == 0, math.inf, math.nan), a)
    return torch.where((c >> (e_bits + m_bits)) > 0, -a, a)


def minifloat(e_bits: int, m_bits: int, bias: int, max_value: float) -> Element:
    kw = {"e_bits": e_bits, "m_bits": m_bits, "bias": bias, "max_value": max_value}
    decode = partial(_mf_decode, **kw)
    values = decode(torch.arange(2 ** (1 + e_bits + m_bits), dtype=torch.uint8))
    levels = values[values.isfinite()].unique().numel()  # -0 == +0 counts once
    return Element(1 + e_bits + m_bits, max_value, levels, partial(_mf_encode, **kw), decode)


MINIFLOATS = {  # OCP 8-bit FP (e4m3 is the "fn" variant) and OCP MX v1.0 fp6/fp4
    "fp8_e4m3": minifloat(4, 3, 7, 448.0),
    "fp8_e5m2": minifloat(5, 2, 15, 57344.0),
    "fp6_e3m2": minifloat(3, 2, 3, 28.0),
    "fp6_e2m3": minifloat(2, 3, 1, 7.5),
    "fp4_e2m1": minifloat(2, 1, 1, 6.0),
}


# ---- code books -----------------------------------------------------------------------------

# QLoRA NormalFloat4, exactly bitsandbytes' table: quantiles of N(0, 1) rescaled to [-1, 1],
# asymmetric so that 0 is exact and both ±1 exist.
NF4_CODE_BOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933235474, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip
_NF4_MIDPOINTS = (NF4_CODE_BOOK[1:] + NF4_CODE_BOOK[:-1]) / 2

NF4 = Element(
    bits=4,
    max_value=1.0,
    levels=16,
    encode=lambda v: torch.bucketize(v, _NF4_MIDPOINTS).to(torch.uint8),  # nearest entry
    decode=lambda c: NF4_CODE_BOOK[c.long()],
)

# BitNet b1.58: round(v) clipped to {-1, 0, 1}, stored as trit t = code + 1.
TERNARY = Element(
    bits=1.6,
    max_value=1.0,
    levels=3,
    encode=lambda v: (torch.round(v).clamp(-1, 1) + 1).to(torch.uint8),
    decode=lambda c: c.float() - 1,
)

# sign(v) with sign(0) = +1, so every weight keeps a nonzero magnitude; bit 1 means negative.
BINARY = Element(1, 1.0, 2, lambda v: (v < 0).to(torch.uint8), lambda c: 1 - 2 * c.float())
