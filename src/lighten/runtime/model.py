"""Swap a model's quantized layers for packed ones (lighten.runtime.linear), in place."""

import contextlib

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten import formats
from lighten.errors import LightenError
from lighten.formats import QuantizedTensor
from lighten.formats.ggml import GGMLFormat
from lighten.runtime.dispatch import choose_kernels
from lighten.runtime.linear import packed_linear


def pack_model(
    model: nn.Module,
    quantized: dict[str, QuantizedTensor],
    w8a8: bool = False,
    outlier_threshold: float | None = None,
    kernels: str = "auto",
) -> nn.Module:
    """Replace each planned Linear / Conv1D (its weight name minus ".weight") by its packed layer and cast
    the rest of the model to the kernels' dtype (compute_dtype): torch's packed kernels compute in bf16, so
    bf16 norms, embeddings and attention keep the activations in bf16 end to end instead of converting at
    every packed layer, and halve the memory of the weights left unquantized; ggml's compute in fp32, and
    on CPUs without AVX512-BF16 torch's bf16 attention is several times slower than its fp32. Planned
    embeddings (a lookup, not a matmul) are dequantized to that dtype.

    `quantized` is what quantize_weights returns: every matrix is [out, in], GPT-2's Conv1D included (it
    stores W as [in, out] but computes x W, the same product as a Linear with weight W^T). With w8a8, an
    `outlier_threshold` (e.g. 6.0) keeps LLM.int8()'s outlier columns out of the int8 product. `kernels`
    ("auto", "torch", "ggml") says where lighten's ints that ggml computes exactly go: choose_kernels."""
    on_ggml = {} if w8a8 else choose_kernels([(q.spec, q.shape) for q in quantized.values()], kernels)
    dtype = compute_dtype([on_ggml.get(q.spec, q.spec) for q in quantized.values()])
    for name, q in quantized.items():
        pack_layer(model, name, q, w8a8, outlier_threshold, dtype, q.spec in on_ggml)
    return model.to(dtype)


def compute_dtype(specs: list[str]) -> torch.dtype:
    """The dtype a model packed with these formats (the GGUF type where one computes on ggml in another's
    place: choose_kernels) computes in: fp32 if every one is a GGUF block type (ggml's kernels take fp32),
    else bf16 (torch's take bf16)."""
    return (
        torch.float32
        if specs and all(isinstance(formats.get(s), GGMLFormat) for s in specs)
        else torch.bfloat16
    )


def pack_layer(
    model: nn.Module,
    name: str,
    q: QuantizedTensor,
    w8a8: bool = False,
    outlier_threshold: float | None = None,
    dtype: torch.dtype = torch.bfloat16,
    on_ggml: bool = False,
) -> None:
    """pack_model for one weight, leaving the dtype of the rest alone (a planned embedding is dequantized to
    `dtype`): a loader packs each layer as it reads its tensors, so that only one layer's tensors are ever
    unpacked at a time."""
    module_name = name.removesuffix(".weight")
    module = model.get_submodule(module_name)
    if isinstance(module, (nn.Linear, Conv1D)):
        parent, _, child = module_name.rpartition(".")
        mode = "w8a8" if w8a8 else "weight-only"
        layer = packed_linear(q, module.bias, mode, outlier_threshold, on_ggml)
        setattr(model.get_submodule(parent), child, layer)
    elif isinstance(module, nn.Embedding):
        old, new = module.weight, nn.Parameter(q.dequantize(dtype), requires_grad=False)
        for owner in model.modules():  # a tied lm_head shares the Parameter: keep it tied
            for key, param in owner.named_parameters(recurse=False):
                if param is old:
                    setattr(owner, key, new)
    else:
        raise LightenError(
            f"{name} belongs to a {type(module).__name__}; only Linear, Conv1D and Embedding pack"
        )


@contextlib.contextmanager
def meta_parameters():
    """Build modules with every parameter on the meta device (no memory, no init) while buffers stay real: the
    non-persistent ones (RoPE frequencies, position ids) are computed in __init__ and are in no checkpoint.
    What accelerate's init_empty_weights(include_buffers=False) does, without the dependency."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
