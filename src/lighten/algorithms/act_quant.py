"""Activation quantization, simulated: each chosen Linear fake-quantizes its input at every forward.

W8A8 / W4A8 quality is a property of the numbers a kernel would see, so the simulation needs no integer
kernel (lighten.runtime has the real W8A8 path). A format applied to an activation [..., tokens, features]
groups along the features, so `int8:channel` is dynamic per-token int8 and `int8:tensor` one scale per
call (dynamic per-tensor). Two variants on top:

- static: one scale per input fixed from calibration data (calibrate_input_scales); values beyond saturate.
- LLM.int8() (Dettmers et al. 2022): the feature columns where any |x| >= outlier_threshold in the current
  input stay in full precision, the others are quantized (per token with int8:channel).

    stats = collect_input_stats(model, tokenizer, wiki_texts("calibration"))
    quantize_inputs(model, names, "int8:tensor", scales=calibrate_input_scales(stats, names))
    quantize_inputs(model, names, "int8:channel", outlier_threshold=6.0)
"""

import torch
from torch import nn

from lighten import formats
from lighten.algorithms.activations import InputStats
from lighten.errors import LightenError
from lighten.formats import Format


def quantize_inputs(
    model: nn.Module,
    names: list[str],
    spec: str = "int8:channel",
    scales: dict[str, dict[str, torch.Tensor]] | None = None,
    outlier_threshold: float | None = None,
) -> list:
    """Fake-quantize the input of each named module to `spec`, with the fixed `scales[name]` if given
    (calibrate_input_scales) and with LLM.int8()'s outlier columns left in full precision if
    `outlier_threshold` is set. Returns the hook handles (`.remove()` them to undo). Hooks run after those
    already registered, e.g. after an online Hadamard rotation."""
    fmt = formats.get(spec)

    def hook_for(name):
        fixed = None if scales is None else scales[name]

        def hook(module, args):
            return (fake_quantize_activation(args[0], fmt, fixed, outlier_threshold), *args[1:])

        return hook

    return [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]


def fake_quantize_activation(
    x: torch.Tensor,
    fmt: Format,
    scales: dict[str, torch.Tensor] | None = None,
    outlier_threshold: float | None = None,
) -> torch.Tensor:
    """x [..., features] quantized to fmt and back: with its own scales (dynamic) or the stored `scales`
    (static); outlier columns, if a threshold is given, pass untouched and are left out of the scales."""
    if outlier_threshold is None:
        return fmt.dequantize(fmt.quantize(x, scales), x.dtype)
    outliers = (x.abs() >= outlier_threshold).reshape(-1, x.shape[-1]).any(0)
    rest = x.masked_fill(outliers, 0)  # zeroed, so that the outliers do not set the per-token scales
    return torch.where(outliers, x, fmt.dequantize(fmt.quantize(rest, scales), x.dtype))


def calibrate_input_scales(
    stats: dict[str, InputStats], names: list[str], spec: str = "int8:tensor"
) -> dict[str, dict[str, torch.Tensor]]:
    """One static scale per named module's input from its calibration statistics (collect_input_stats):
    the largest |x| seen maps to the format's largest element (int8: absmax / 127), stored as the format
    stores it (fp16, rounded up so that no calibration value clips)."""
    fmt = formats.get(spec)
    if fmt.granularity != "tensor" or fmt.rule != "absmax":
        raise LightenError(
            f"static activation scales need a symmetric per-tensor format such as int8:tensor, got {spec!r}"
        )
    missing = [name for name in names if name not in stats]
    if missing:
        raise LightenError(f"no calibration statistics for {', '.join(missing)}; collect them for every name")
    # Quantizing the one value absmax applies the format's own scale rule to it; keep all but the code.
    quantized = {name: fmt.quantize(stats[name].absmax.max().view(1)) for name in names}
    return {name: {k: t for k, t in q.tensors.items() if k != "codes"} for name, q in quantized.items()}
