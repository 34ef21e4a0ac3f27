"""How much each weight matters, per candidate format: the cost side of mixed-precision allocation.

A weight's sensitivity to a format is measured, not modelled: quantize that one weight (in place), run the
calibration windows, and compare the output with the original model's:

    causal LM   mean over tokens of KL(p_original || p_perturbed) of the next-token distribution
    encoder     1 - mean over tokens of cos(h_original, h_perturbed) of the last hidden state

Probing one weight at a time assumes the errors of different weights add up, the assumption every
per-layer allocator (HAWQ, LQ-LoRA, BAQ) makes so that the total cost is a sum the ILP can minimise.

`imatrix_sensitivity` is the fast estimate that llama.cpp's target-bpw work uses: no forward pass per
candidate, only each layer's input importance (the imatrix: mean x^2 of each input column over the
calibration tokens) weighing the weight error, sum_j importance_j sum_i (W - Q(W))^2_ij, the expected
squared error of the layer's own output if its inputs were uncorrelated. It does not see how an error in
one layer's output reaches the logits; the probes do.

`hessian_trace_sensitivity` is the cheaper HAWQ-style proxy (no forward pass per candidate): the
Hutchinson estimate of the mean Hessian eigenvalue of that divergence w.r.t. the weight, times
||Q(W) - W||^2 / 2. It assumes the quantization error is isotropic; the probes assume nothing.

`importance` ({weight name: mean x^2 per input column}, input_importance) given to the probes makes GGUF
types quantize with llama.cpp's importance-weighted search, as algorithm imatrix will.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.pytorch_utils import Conv1D

from lighten import formats
from lighten.algorithms.activations import collect_input_stats, token_windows
from lighten.algorithms.imatrix import imatrix_quantize
from lighten.errors import LightenError
from lighten.models import model_kind
from lighten.progress import track
from lighten.quantize import dequantize_weight, is_transposed


@torch.inference_mode()
def layer_sensitivity(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    plan_candidates: dict[str, list[str]],
    n_tokens: int = 256,
    context: int = 256,
    importance: dict[str, torch.Tensor] | None = None,
) -> dict[tuple[str, str], float]:
    """{(weight name, spec): output divergence when only that weight is quantized to spec}, GGUF types
    weighted by their weight's `importance` where given (as algorithm imatrix quantizes).

    Every other weight stays in full precision; each probed weight is restored bit for bit afterwards."""
    model.eval()
    windows = token_windows(tokenizer, texts, n_tokens, context)
    causal = model_kind(model) == "causal"
    divergence = _kl if causal else _cosine_distance
    reference = [_output(model, causal, w) for w in windows]  # once, for every probe
    probes = [(name, spec) for name, specs in plan_candidates.items() for spec in specs]
    sensitivity = {}
    for name, spec in track(probes, "sensitivity"):
        param = model.get_parameter(name)
        original = param.detach().clone()
        param.copy_(quantized_weight(model, name, spec, (importance or {}).get(name)).to(param.dtype))
        try:
            total = sum(
                divergence(ref, _output(model, causal, w)).item()
                for ref, w in zip(reference, windows, strict=True)
            )
        finally:
            param.copy_(original)
        # A divergence is >= 0; rounding can push a ~0 one (a weight the output ignores) just below.
        sensitivity[name, spec] = max(total, 0.0) / sum(len(w) for w in windows)
    return sensitivity


def quantized_weight(
    model: nn.Module, name: str, spec: str, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight `name` after a round trip through `spec`, in fp32 and in the model's orientation; GGUF types
    weigh their scale search by `importance` (one value per input column) when given one."""
    w = model.get_parameter(name).detach().float()
    q = imatrix_quantize(w.t() if is_transposed(model, name) else w, formats.get(spec), importance)
    return dequantize_weight(model, name, q)


def input_importance(
    model: nn.Module, tokenizer, texts: list[str], names: list[str], n_tokens: int, context: int
) -> dict[str, torch.Tensor]:
    """{weight name: mean x^2 of each input column of its layer} over the first `n_tokens` tokens of `texts`
    (windows of `context`), on the model as it is, as llama-imatrix collects it; for the Linear / Conv1D
    weights among `names` (an embedding table's input is token ids: it has none)."""
    layers = {n.removesuffix(".weight"): n for n in names}
    layers = {m: n for m, n in layers.items() if isinstance(model.get_submodule(m), (nn.Linear, Conv1D))}
    stats = collect_input_stats(model, tokenizer, texts, n_tokens, context, names=list(layers))
    return {layers[m]: s.mean_sq for m, s in stats.items()}


def imatrix_sensitivity(
    model: nn.Module,
    plan_candidates: dict[str, list[str]],
    importance: dict[str, torch.Tensor],
    search_importance: dict[str, torch.Tensor] | None = None,
) -> dict[tuple[str, str], float]:
    """{(weight name, spec): sum_j importance_j sum_i (W - Q(W))^2_ij} over W's [out, in] entries, with Q
    quantizing as quantized_weight does (GGUF types weighted by `search_importance` when given, as algorithm
    imatrix quantizes). An estimate, not a measurement (module docstring); LightenError for a weight
    without importance (an embedding table), which only the measured KL can rate."""
    if missing := [name for name in plan_candidates if name not in importance]:
        raise LightenError(
            f"sensitivity imatrix weighs the input columns of linear layers, and {missing[0]} is none (an "
            "embedding table): use sensitivity kl, or leave it out of the budget"
        )
    sensitivity = {}
    for name, specs in track(plan_candidates.items(), "imatrix sensitivity"):
        w = model.get_parameter(name).detach().float()
        searched = (search_importance or {}).get(name)
        for spec in specs:
            error = quantized_weight(model, name, spec, searched) - w
            if is_transposed(model, name):
                error = error.t()
            sensitivity[name, spec] = weighted_error(error, importance[name])
    return sensitivity


def weighted_error(error: torch.Tensor, importance: torch.Tensor) -> float:
    """sum_j importance_j sum_i error_ij^2 of an [out, in] error, in float64."""
    return (error.double().square().sum(0) * importance.double()).sum().item()


def _output(model: nn.Module, causal: bool, window: torch.Tensor) -> torch.Tensor:
    """[tokens, ...] fp32 output of one window: next-token log-probs (causal LMs) or last hidden states."""
    if causal:
        return F.log_softmax(model(input_ids=window[None], use_cache=False).logits[0].float(), dim=-1)
    return model(input_ids=window[None]).last_hidden_state[0].float()


def hessian_trace_sensitivity(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    plan_candidates: dict[str, list[str]],
    n_tokens: int = 256,
    context: int = 256,
    samples: int = 4,
    seed: int = 0,
) -> dict[tuple[str, str], float]:
    """HAWQ's proxy, not a measurement: {(weight name, spec): Tr(H) / numel(W) * ||Q(W) - W||^2 / 2}.

    H is the Hessian w.r.t. W of the divergence layer_sensitivity measures, at the original weights, where
    the divergence and its gradient are 0: by Taylor the divergence of a perturbation D is D^T H D / 2, and
    replacing H by its mean eigenvalue (HAWQ) gives the formula above, in the same units as the measured
    sensitivity. Tr(H) comes from Hutchinson's estimator E[v^T H v] over random-sign v: one double backward
    pass per window and sample for all weights at once, instead of one forward per (weight, candidate)."""
    model.eval()
    windows = token_windows(tokenizer, texts, n_tokens, context)
    causal = model_kind(model) == "causal"
    divergence = _kl if causal else _cosine_distance
    names = list(plan_candidates)
    params = [model.get_parameter(name) for name in names]
    generator = torch.Generator().manual_seed(seed)
    trace = torch.zeros(len(params), dtype=torch.float64)
    for window in track([w for w in windows for _ in range(samples)], "Hessian traces"):
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
            out = _output(model, causal, window)
        loss = divergence(out.detach(), out) / len(window)  # 0 with zero gradient, but not zero curvature
        # A weight the output does not depend on (BERT's pooler) has no gradient: its trace is 0.
        grads = torch.autograd.grad(
            loss, params, create_graph=True, allow_unused=True, materialize_grads=True
        )
        signs = [torch.randint(0, 2, p.shape, generator=generator).to(p.dtype) * 2 - 1 for p in params]
        gv = sum((g * v).sum() for g, v in zip(grads, signs, strict=True))
        hv = torch.autograd.grad(gv, params, allow_unused=True, materialize_grads=True)
        trace += torch.tensor(
            [(v * h).sum().item() for v, h in zip(signs, hv, strict=True)], dtype=torch.float64
        )
    trace /= len(windows) * samples
    sensitivity = {}
    for name, p, t in zip(names, params, trace, strict=True):
        for spec in plan_candidates[name]:
            error = (quantized_weight(model, name, spec) - p.detach().float()).pow(2).sum().item()
            sensitivity[name, spec] = t.item() / p.numel() * error / 2
    return sensitivity


def _kl(ref_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of KL(p || q)."""
    return (ref_logp.exp() * (ref_logp - logq)).sum()


def _cosine_distance(ref: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of 1 - cos(ref, h), as |u - v|^2 / 2 of the unit vectors: exactly 0 for equal
    vectors and accurate for tiny angles, where 1 - cos cancels to fp32 noise."""
    return (F.normalize(ref, dim=-1) - F.normalize(h, dim=-1)).pow(2).sum() / 2
