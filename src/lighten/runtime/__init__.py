"""Packed CPU runtime: quantized weights stay packed in memory and matmuls run on low-bit kernels.

    model = pack_model(model, quantize_weights(model, plan))   # in place; the rest goes bf16 (fp32 on ggml)
    layer = packed_linear(q, bias)                             # one layer; mode="w8a8" for int8 x int8

Which kernel each format takes is in lighten.runtime.linear. A packed model's quantized layers hold their
packed bytes only (about QuantizedTensor.nbytes each); no full-precision copy of their weights is kept.
"""

from lighten.runtime.linear import PackedLinear, packed_linear
from lighten.runtime.model import meta_parameters, pack_layer, pack_model

__all__ = ["PackedLinear", "meta_parameters", "pack_layer", "pack_model", "packed_linear"]
