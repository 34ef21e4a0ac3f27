"""The number-format zoo: exact encoders/decoders and their packed storage.

    fmt = get("int4:g128")        # Format; fmt.name == "int4:g128:sym"
    q = fmt.quantize(w)           # QuantizedTensor: q.tensors holds every stored buffer
    w_hat = q.dequantize()        # or fmt.fake_quantize(w) for both steps at once
    part = q.rows(a, b)           # rows a:b (of q.shape[-1]) as a QuantizedTensor of slices of q's buffers

Spec grammar
------------
    NAME[:GRANULARITY][:sym|:asym][:dq]

GRANULARITY is `tensor` (one scale), `channel` (one scale per row, i.e. per output channel;
the last dim is the row) or `gN` (groups of N consecutive elements of a row, N >= 1). Groups
never cross rows; when N does not divide the row length the last group of each row is shorter
and still has its own scale. Options may come in any order, each at most once; case is ignored.

NAME                      default        element codes                               scale
int2 .. int7              g128, sym      b-bit ints                                  fp16
int8                      channel, sym
  :sym   codes in [-(2^(b-1)-1), 2^(b-1)-1], two's complement; int4 has 15 levels (-8 unused);
         x = code * scale, scale = absmax / (2^(b-1)-1)
  :asym  codes in [0, 2^b-1], x = (code - zero) * scale, scale = (max - min) / (2^b-1) with
         min <= 0 <= max so 0 is exact; the integer zero-point is stored packed at b bits
fp8_e4m3, fp8_e5m2        channel        OCP fp8 (e4m3 = "fn": no inf, max 448)      fp16
fp6_e3m2, fp6_e2m3        g32            OCP MX fp6 (no inf/NaN, max 28 / 7.5)       fp16
fp4_e2m1                  g32            OCP MX fp4 (no inf/NaN, max 6)              fp16
  minifloats: scale = absmax / max, round-to-nearest-even incl. subnormals, saturating
mxfp8 (= mxfp8_e4m3), mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4, mxint8
                          g32 (fixed)    OCP Microscaling v1.0 elements              E8M0 byte
  shared exponent = floor(log2 absmax) - emax(element), clamped to [-127, 127], stored + 127;
  a zero block gets the smallest scale (byte 0). mxint8 elements are int8 * 2^-6, in [-127, 127].
nf4                       g64            QLoRA NormalFloat4 code book                fp32 absmax
  :dq    double quantization: absmax - mean as int8, one fp32 scale per 256 absmaxes (4.127 bits)
ternary                   tensor         BitNet b1.58 {-1, 0, 1}, 5 trits per byte   fp16 absmean
  codes = clamp(round(x / mean|x|), -1, 1); 1.6 bits per element plus the scale
binary                    channel        sign(x) (sign(0) = +1), 1 bit               fp16 absmean
q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl iq4_xs q2_k q3_k q4_k q5_k q6_k tq1_0 tq2_0
                          fixed blocks   GGUF's block types, no options: lighten.formats.ggml (one `blocks`
                                         buffer of GGUF bytes; quantize(x, importance=None))

Scales are stored as fp16 unless noted. For ints and fp* they are rounded UP to the next fp16
and encoding uses that stored scale, so no element clips and int error is at most scale / 2
(groups with absmax beyond 65504 * max_value saturate). Ternary/binary round to nearest fp16.
`bits_per_element` counts group scales and zero-points; per-channel and per-tensor scales add
16 / row_length bits and are not counted.

Storage (Format.layout): `codes` is one packed stream of all elements, row-major (packing.py
gives the bit and trit order); signed ints and mxint8 are two's complement, minifloats are
sign|exponent|mantissa, nf4 is the code-book index, ternary stores code + 1, binary stores 1
for negative. `scales` has shape (rows, groups per row); asym adds packed `zeros`, nf4:dq adds
`scales_scale` and `scales_mean`.

Only formats/ parses these buffers; everything else reads a stored tensor through its Format:
codes(q) (the unpacked element codes, rows x K), zero_points(q), scale_zero(q) (fp32 per group),
dequantize_values(q, values) (scales applied to element values decoded elsewhere, e.g. by a table),
row_align(shape) and row_slice(q, a, b) = q.rows(a, b), and q.scale_buffers() (what quantize(x,
scales=...) takes).
"""

import importlib

__all__ = ["Format", "QuantizedTensor", "get", "list_formats"]


def __getattr__(name: str):
    # Lazy, so that lighten.formats.spec (what recipes check specs with) imports without torch.
    if name in __all__:
        return getattr(importlib.import_module("lighten.formats.format"), name)
    raise AttributeError(f"module 'lighten.formats' has no attribute {name!r}")
