"""Quantization of a plan's weights one at a time ({weight name: spec}, see lighten.plan), by default
round to nearest, as [out, in] matrices: GPT-2's Conv1D stores its weight transposed.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten import formats
from lighten.algorithms.rtn import RTN
from lighten.formats import QuantizedTensor
from lighten.models import WeightReader
from lighten.progress import track


def is_transposed(model: nn.Module, weight_name: str) -> bool:
    """GPT-2's Conv1D stores W as [in, out]; we quantize W^T so groups run along the input dimension."""
    return isinstance(model.get_submodule(weight_name.rsplit(".", 1)[0]), Conv1D)


def weight_shape(model: nn.Module, weight_name: str) -> tuple[int, ...]:
    """The weight's shape as it is quantized, [out, in]: rows run along the inputs, whatever the storage."""
    shape = tuple(model.get_parameter(weight_name).shape)
    return shape[::-1] if is_transposed(model, weight_name) else shape


def quantize_weights(
    model: nn.Module,
    plan: dict[str, str],
    weights: WeightReader | None = None,
    quantize_weight: Callable = RTN.quantize_weight,
    stats: dict[str, torch.Tensor] | None = None,
) -> dict[str, QuantizedTensor]:
    """Each planned weight quantized on its own, as an [out, in] matrix, by `quantize_weight` (of an
    Algorithm that collects nothing: round to nearest by default, or of one given its statistic per weight
    name up front in `stats`). `weights` (a reader from
    lighten.models.open_weights, for a model that still equals its files) reads each weight from the files
    instead: the model's own may be pages of a mapped file, which stay in RSS once touched."""
    quantized = {}
    for name in track(plan, "quantizing weights"):
        w = model.get_parameter(name)
        stored = weights(name) if weights else None
        if stored is not None and stored.shape == w.shape:
            w = stored
        w = w.detach().float()
        if is_transposed(model, name):
            w = w.t()
        quantized[name] = quantize_weight(w, formats.get(plan[name]), (stats or {}).get(name))
    return quantized


def dequantize_weight(model: nn.Module, name: str, q: QuantizedTensor) -> torch.Tensor:
    """The full-precision weight as the model stores it (undoing the Conv1D transpose)."""
    w = q.dequantize(torch.float32)
    return w.t().contiguous() if is_transposed(model, name) else w
