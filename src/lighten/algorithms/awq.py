"""AWQ (activation-aware weight quantization): protect the input channels that carry large activations by
scaling them up before quantization and folding the inverse scale into whatever produces the input.

For a linear y = W x with per-input-channel scales s, W x = (W diag(s)) (diag(s)^-1 x) exactly. Quantizing
W diag(s) instead of W gives the columns of salient channels (large mean |x|) more of each group's grid,
at the cost of the others; s = mean|x|^alpha, with alpha searched on calibration inputs to minimise
||Q(W diag(s)) diag(s)^-1 x - W x|| summed over the linears that read the same x. alpha = 0 is plain RTN.

In a pre-norm block diag(s)^-1 folds exactly into the norm that feeds the linears (gamma and beta / s), so
the model computes the same function with no extra op: only the quantization error changes.

GGUF types are searched and quantized with llama.cpp's importance-weighted scale search, the importance
being the mean (x / s)^2 of each input column of the rescaled inputs (the imatrix of the folded model).
"""

import math

import torch
from torch import nn

from lighten import formats
from lighten.algorithms.activations import InputStats
from lighten.algorithms.imatrix import imatrix_quantize
from lighten.algorithms.registry import SAMPLES, Algorithm
from lighten.errors import LightenError
from lighten.formats import Format, QuantizedTensor
from lighten.models.arch import ModelView, NormGroup, model_view, weight_out_in
from lighten.progress import note
from lighten.quantize import quantize_weights
from lighten.surgery.smooth import scale_norm_group


def awq_error(x: torch.Tensor, linears: list[nn.Module], fmt: Format, s: torch.Tensor) -> float:
    """Squared output error on inputs x [tokens, in] of quantizing each linear with scales s."""
    err = 0.0
    importance = _importance(x, s)
    for linear in linears:
        w = weight_out_in(linear).detach().float()
        w_hat = imatrix_quantize(w * s, fmt, importance).dequantize() / s
        err += (x @ (w_hat - w).t()).square().sum().item()
    return err


def awq_search_scales(x: torch.Tensor, linears: list[nn.Module], fmt: Format, grid: int = 20) -> torch.Tensor:
    """Per-input-channel scales s = mean|x|^alpha for the alpha in {0, 1/grid, ..., 1} with the least
    awq_error over `linears` (which all read x [tokens, in]). Ties keep the smaller alpha."""
    x = x.float()
    mean_abs = x.abs().mean(0)
    best_err, best = math.inf, None
    for i in range(grid + 1):  # alpha = 0 gives s = 1: plain RTN
        # Floor dead channels so s stays invertible; then centre s on 1 (a global factor is absorbed by
        # the group scales anyway) to keep W diag(s) within the fp16 range of the stored scales.
        s = mean_abs.pow(i / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = awq_error(x, linears, fmt, s)
        if err < best_err:
            best_err, best = err, s
    return best


def _importance(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """mean (x / s)^2 per input column: what llama.cpp's search weighs the rescaled weights' columns by."""
    return (x / s).square().mean(0)


def awq_scale_group(
    group: NormGroup, x: torch.Tensor, plan: dict[str, str], grid: int = 20
) -> dict[str, torch.Tensor]:
    """Search and fold the scales of one norm group, judged on the planned linears among its readers (the
    others are folded too, which keeps them exact). Returns {reader: mean x^2 per input column of its
    rescaled inputs}, the importance its GGUF-type quantization weighs columns by. No planned reader:
    nothing to do."""
    planned = [name for name in group.linears if f"{name}.weight" in plan]
    if not planned:
        return {}
    specs = {plan[f"{name}.weight"] for name in planned}
    if len(specs) > 1:
        raise LightenError(
            f"AWQ shares one set of scales per norm; {group.name}'s readers are planned as {specs}"
        )
    s = awq_search_scales(x, [group.linears[name] for name in planned], formats.get(specs.pop()), grid)
    scale_norm_group(group, s)
    return dict.fromkeys(group.linears, _importance(x.float(), s))


def norms_to_fold(view: ModelView, algorithm: str = "AWQ") -> bool:
    """Whether the model has pre-norms to fold scales into; if not (post-LN: its norms also write the
    residual stream, so a scale folded into them would not cancel; OLMo-2: no norm before the linears), a
    note that it gets plain RTN."""
    if not view.pre_norm:
        note(f"{algorithm}: {view.family} has no pre-norms (read by linears only) to fold scales into: RTN")
    return view.pre_norm


def awq_apply(
    model: nn.Module,
    stats_or_inputs: dict[str, InputStats | torch.Tensor],
    plan: dict[str, str],
    grid: int = 20,
) -> dict[str, QuantizedTensor]:
    """AWQ on every norm group of the model's blocks, then RTN of the plan. `stats_or_inputs` maps each
    linear's module name to its input rows [tokens, in] or InputStats with a sample (collect_input_stats
    with samples > 0); one reader per group is enough. Modifies the model in place: the norms and linears
    hold the folded weights that the returned tensors quantize. Post-norm models (BERT) get plain RTN
    (norms_to_fold)."""
    view = model_view(model)
    if not norms_to_fold(view):
        return quantize_weights(model, plan)
    importance = {}
    for group in (g for block in view.blocks for g in (block.attn, block.mlp)):
        source = next((stats_or_inputs[n] for n in group.linears if n in stats_or_inputs), None)
        if source is None:
            raise LightenError(f"AWQ needs the inputs of {group.name}'s readers ({', '.join(group.linears)})")
        x = source.sample if isinstance(source, InputStats) else source
        if len(x) == 0:
            raise LightenError("AWQ needs input samples: collect_input_stats(..., samples=4096)")
        importance |= awq_scale_group(group, x, plan, grid)
    stats = {f"{name}.weight": imp for name, imp in importance.items()}
    return quantize_weights(model, plan, quantize_weight=imatrix_quantize, stats=stats)


# Scales searched on each norm group's input samples and folded into the norm, then round to nearest
# (importance-weighted for GGUF types).
AWQ = Algorithm("awq", SAMPLES, imatrix_quantize, rescale_group=awq_scale_group)
