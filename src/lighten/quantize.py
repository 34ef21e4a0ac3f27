"""Which weights to quantize (a plan) and round-to-nearest quantization of them.

A plan maps weight names (as in `model.state_dict()`) to a canonical format spec. Only weights that
feed matrix multiplies are candidates: Linear layers, GPT-2's Conv1D (stored transposed) and, on request,
embedding tables. Norms and biases always stay in full precision; lm_head is skipped by default because
the logits are the most sensitive matmul in a language model (and in tied models it *is* the embedding).
"""

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten import formats
from lighten.errors import LightenError
from lighten.formats import QuantizedTensor
from lighten.models import WeightReader
from lighten.progress import track

DEFAULT_SKIP = ("lm_head",)


def make_plan(
    model: nn.Module, spec: str, skip: tuple[str, ...] = DEFAULT_SKIP, embeddings: bool = False
) -> dict[str, str]:
    """One format for every Linear/Conv1D weight (and embedding, if asked) whose module name matches no
    `skip` regex. A weight tied to an embedding follows the `embeddings` flag; tied weights appear once."""
    spec = formats.get(spec).name
    try:
        patterns = [re.compile(p) for p in skip]
    except re.error as e:
        raise LightenError(f"bad --skip pattern: {e}") from e
    embedding_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    plan, seen = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D, nn.Embedding)):
            continue
        ptr = module.weight.data_ptr()
        if ptr in embedding_ptrs and not embeddings:
            continue
        if ptr in seen or any(p.search(name) for p in patterns):
            continue
        seen.add(ptr)
        plan[f"{name}.weight"] = spec
    if not plan:
        raise LightenError("the plan is empty: no Linear weight is left after --skip; loosen --skip")
    return plan


def is_transposed(model: nn.Module, weight_name: str) -> bool:
    """GPT-2's Conv1D stores W as [in, out]; we quantize W^T so groups run along the input dimension."""
    return isinstance(model.get_submodule(weight_name.rsplit(".", 1)[0]), Conv1D)


def quantize_weights(
    model: nn.Module, plan: dict[str, str], weights: WeightReader | None = None
) -> dict[str, QuantizedTensor]:
    """Round-to-nearest quantization of each planned weight, as [out, in] matrices. `weights` (a reader from
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
        quantized[name] = formats.get(plan[name]).quantize(w)
    return quantized


def dequantize_weight(model: nn.Module, name: str, q: QuantizedTensor) -> torch.Tensor:
    """The full-precision weight as the model stores it (undoing the Conv1D transpose)."""
    w = q.dequantize(torch.float32)
    return w.t().contiguous() if is_transposed(model, name) else w
