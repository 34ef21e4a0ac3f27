"""ggml's Q6_K and Q4_K k-quants, packed in numpy (the gguf package can only dequantize k-quants).

Both quantizers pick scales so that no weight lands off its grid: the error is at most half a step. ggml's
own quantizers search scales for the least squared error instead; these are simpler and provably bounded.

A Q6_K super-block holds 256 weights as 16 sub-blocks of 16, each with an int8 scale under one fp16 super
scale d: w = d * scale[sub] * (q - 32), q in 0..63. Byte layout of one 210-byte block (ggml-common.h):

    ql[128]     low 4 bits of q     qh[64]    high 2 bits of q     scales[16] int8     d fp16

The bit order is the one ggml's dequantizer reads: in each half of 128 weights, ql[l] holds weights l and
l+64 (low and high nibble), ql[32+l] holds l+32 and l+96, and qh[l] holds the top two bits of l, l+32,
l+64 and l+96 at bit 0, 2, 4 and 6.

A Q4_K super-block holds 256 weights as 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min under
fp16 super scales d and dmin: w = d * scale[sub] * q - dmin * min[sub], q in 0..15. One 144-byte block:

    d fp16    dmin fp16    scales[12] (8 scales and 8 mins, 6 bits each)    qs[128]

scales[j] and scales[j+4] (j < 4) hold scale j and min j in their low 6 bits and the top 2 bits of scale
j+4 and min j+4 in their high 2 bits; scales[j+8] holds the low 4 bits of scale j+4 and min j+4. In each
64 weights, qs[l] holds weight l in its low nibble and weight l+32 in its high one.
"""

import numpy as np
import torch

from lighten.formats.format import fp16_ceil

QK_K = 256
SUB = 16  # weights per sub-block


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """Pack a float array whose last dimension is a multiple of 256 into Q6_K bytes (last dim → 210 / 256)."""
    x = rows.astype(np.float32).reshape(-1, QK_K // SUB, SUB)
    # A sub-scale of absmax / 31.5 keeps every |x / scale| <= 31.5, so rounding lands inside q - 32 in
    # [-32, 31] and the error is at most half a step. Simpler than ggml's RMSE search, provably bounded.
    sub_scale = np.abs(x).max(axis=-1) / 31.5
    d = _fp16_ceil(sub_scale.max(axis=-1) / 127)
    # Rounding the int8 sub-scales *up* keeps the effective step >= the ideal one, so the bound survives.
    scales = np.clip(np.ceil(_ratio(sub_scale, d[:, None])), 0, 127).astype(np.int8)
    step = d[:, None].astype(np.float32) * scales
    q = (np.clip(np.rint(_ratio(x, step[..., None])), -32, 31) + 32).astype(np.uint8)
    packed = pack_q6_k(q.reshape(-1, QK_K), scales, d)
    return packed.reshape(*rows.shape[:-1], rows.shape[-1] // QK_K * packed.shape[-1])


def pack_q6_k(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Blocks from their parts: q (n, 256) uint8 in 0..63, scales (n, 16) int8, d (n,) fp16 → (n, 210)."""
    # [block, half, quarter, l] is weight 128 * half + 32 * quarter + l
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)
    qh = sum((q[:, :, j] >> 4) << (2 * j) for j in range(4)).astype(np.uint8)
    n = q.shape[0]
    return np.concatenate(
        [
            ql.reshape(n, 128),
            qh.reshape(n, 64),
            scales.astype(np.int8).reshape(n, 16).view(np.uint8),
            d.astype(np.float16).reshape(n, 1).view(np.uint8),
        ],
        axis=1,
    )


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """Pack a float array whose last dimension is a multiple of 256 into Q4_K bytes (last dim → 144 / 256)."""
    x = rows.astype(np.float32).reshape(-1, 8, 32)
    # The grid of a sub-block runs from -offset to -offset + 15 steps. The offset is rounded up (grid starts
    # at or below the smallest weight, and at or below 0, as ggml's format requires), then the step is made
    # to reach the largest weight from there, rounded up too: every weight lies on the grid's span.
    below_zero = np.maximum(-x.min(axis=-1), 0)
    dmin = _fp16_ceil(below_zero.max(axis=-1) / 63)
    mins = np.clip(np.ceil(_ratio(below_zero, dmin[:, None])), 0, 63).astype(np.uint8)
    offset = dmin[:, None].astype(np.float32) * mins
    sub_scale = (np.maximum(x.max(axis=-1), 0) + offset) / 15
    d = _fp16_ceil(sub_scale.max(axis=-1) / 63)
    scales = np.clip(np.ceil(_ratio(sub_scale, d[:, None])), 0, 63).astype(np.uint8)
    step = d[:, None].astype(np.float32) * scales
    q = np.clip(np.rint(_ratio(x + offset[..., None], step[..., None])), 0, 15)
    packed = pack_q4_k(q.reshape(-1, QK_K), scales, mins, d, dmin)
    return packed.reshape(*rows.shape[:-1], rows.shape[-1] // QK_K * packed.shape[-1])


def pack_q4_k(q, scales, mins, d, dmin) -> np.ndarray:
    """Blocks from their parts: q (n, 256) in 0..15, scales and mins (n, 8) in 0..63, d and dmin (n,) fp16
    → (n, 144) uint8."""
    q = q.astype(np.uint8).reshape(-1, 4, 2, 32)  # [block, 64-chunk, half, l]
    sc, mn = scales.astype(np.uint8), mins.astype(np.uint8)
    packed_scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )
    n = q.shape[0]
    return np.concatenate(
        [
            d.astype(np.float16).reshape(n, 1).view(np.uint8),
            dmin.astype(np.float16).reshape(n, 1).view(np.uint8),
            packed_scales,
            (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128),
        ],
        axis=1,
    )


def _ratio(x: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """x / unit, and 0 where the unit is 0 (an all-zero block or sub-block)."""
    unit = unit.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(unit > 0, x / unit, 0)


def _fp16_ceil(x: np.ndarray) -> np.ndarray:
    """The smallest fp16 >= x (x >= 0 fp32), as lighten's own fp16 scales are rounded."""
    return fp16_ceil(torch.from_numpy(x)).numpy()
