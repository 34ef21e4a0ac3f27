"""Round-to-nearest with a clipping search: the data-free baseline the calibrated algorithms must beat.

Absmax scaling spends the whole grid on the largest weight of a group. When one weight is an outlier, a
smaller scale that saturates it can round every other weight of the group more finely and lower the
group's total squared error; mse_clip_quantize tries a few such scales per group and keeps the best.
"""

import math

import torch

from lighten.algorithms.registry import NOTHING, Algorithm
from lighten.errors import LightenError
from lighten.formats import Format, QuantizedTensor
from lighten.formats.format import grouped
from lighten.formats.ggml import GGML_SCALES, GGMLFormat

CLIP_GRID = torch.linspace(1.0, 0.5, 11)  # 1.0 first: a group keeps the plain RTN scale unless clipping helps


def clipped_quantize(w: torch.Tensor, fmt: Format, ratio: torch.Tensor) -> QuantizedTensor:
    """Quantize w with each group's scale taken from the group shrunk by `ratio` (rows, groups per row):
    the scale rule then sees ratio * absmax (or ratio * min and max), and the rest saturates."""
    rows, k, g, _ = fmt.geometry(tuple(w.shape))
    shrunk = w.reshape(rows, k) * ratio.repeat_interleave(g, 1)[:, :k]
    return fmt.quantize(w, scales=fmt.quantize(shrunk.reshape(w.shape)).scale_buffers())


def group_sq_error(w: torch.Tensor, w_hat: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Squared error summed over each group: (rows, groups per row)."""
    rows, k, g, groups = fmt.geometry(tuple(w.shape))
    return grouped((w - w_hat).reshape(rows, k).square(), g, groups).sum(-1)


def mse_clip_quantize(w: torch.Tensor, fmt: Format, grid: torch.Tensor = CLIP_GRID) -> QuantizedTensor:
    """RTN where each group keeps the clip ratio from `grid` with the least squared error. With 1.0 in the
    grid no group is worse than RTN (ties keep the earlier ratio, so list 1.0 first). nf4:dq shares its
    double quantization across groups, so its per-group guarantee is only approximate."""
    if isinstance(fmt, GGMLFormat):
        raise LightenError(f"MSE clipping cannot produce {fmt.name}: {GGML_SCALES}")
    w = w.detach().float()
    rows, _, _, groups = fmt.geometry(tuple(w.shape))
    best_err = torch.full((rows, groups), math.inf)
    best = torch.ones(rows, groups)
    for r in grid.tolist():
        ratio = torch.full((rows, groups), r)
        err = group_sq_error(w, clipped_quantize(w, fmt, ratio).dequantize(), fmt)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, ratio, best)
    return clipped_quantize(w, fmt, best)


RTN = Algorithm("rtn", NOTHING, lambda w, fmt, _: fmt.quantize(w))
MSE = Algorithm("mse", NOTHING, lambda w, fmt, _: mse_clip_quantize(w, fmt))
