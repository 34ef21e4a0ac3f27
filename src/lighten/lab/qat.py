"""Quantization-aware training: the forward pass computes with quantized weights (and activations), the
backward pass hands the gradient to the full-precision weights as if the rounding were the identity (the
straight-through estimator, STE), so training learns weights that survive the rounding.

The quantizers are the zoo's own (lighten.formats), so a model trained against a format is then quantized
by exactly the function it was trained with:

    prepare_qat(model, "ternary", activations="int8:channel")   # BitNet b1.58: absmean ternary weights,
                                                                # per-token absmax int8 activations
    prepare_qat(model, "int4:g32")                              # weight-only int4

BitNet b1.58's activations use the range ±127 here (the zoo's symmetric int8), the paper ±128 (Q_b = 2^7)."""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten import formats
from lighten.errors import LightenError

BITNET = ("ternary", "int8:channel")  # (weights, activations) of BitNet b1.58


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """`quantized` in the forward pass, the gradient of x unchanged in the backward pass."""
    return x + (quantized - x).detach()


class QATLinear(nn.Linear):
    """An nn.Linear that computes with its weight fake-quantized to `weight_format` and, if given, its input
    to `activation_format` (grouped along the features: int8:channel is per token), both straight-through."""

    def __init__(self, linear: nn.Linear, weight_format: str, activation_format: str | None = None):
        # built on the meta device, then given the linear's own parameters: shared, not copied
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        self.weight_format = formats.get(weight_format)
        self.activation_format = formats.get(activation_format) if activation_format else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_format is not None:
            x = straight_through(x, self.activation_format.fake_quantize(x.detach()))
        w = straight_through(self.weight, self.weight_format.fake_quantize(self.weight.detach()))
        return nn.functional.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        act = self.activation_format.name if self.activation_format else "full precision"
        return f"{super().extra_repr()}, weights {self.weight_format.name}, activations {act}"


def prepare_qat(
    model: nn.Module, weight_format: str, activations: str | None = None, names: list[str] | None = None
) -> list[str]:
    """Replace the nn.Linear modules `names` (default: all but the output head) by QATLinear sharing their
    parameters; returns the names replaced. Undo with plain_linears."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if names is None:
        names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for name in names:
        linear = model.get_submodule(name)
        if isinstance(linear, Conv1D) or type(linear) is not nn.Linear:
            raise LightenError(f"QAT replaces nn.Linear modules; {name} is a {type(linear).__name__}")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QATLinear(linear, weight_format, activations))
    return names


def plain_linears(model: nn.Module) -> None:
    """Turn every QATLinear back into an nn.Linear holding the same (full-precision) parameters."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QATLinear):
            linear = nn.Linear(
                module.in_features, module.out_features, module.bias is not None, device="meta"
            )
            linear.weight, linear.bias = module.weight, module.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
