"""Per-channel scaling (and shifting) of each norm's output, compensated in the linears that read it.

A norm's output feeds only its readers in a pre-norm model, so dividing its channel j by s_j (γ_j, β_j ← /s_j)
and multiplying input column j of every reader by s_j leaves the outputs unchanged while moving activation
outliers into the weights, where per-channel quantization copes with them:

- SmoothQuant (Xiao et al., 2023): s_j = max|X_j|^α / max|W_j|^(1-α), W_j the column j of all readers;
- Outlier Suppression+ (Wei et al., 2023): first shift each channel to the centre of its range,
  z_j = (max X_j + min X_j) / 2 (β ← β - z, reader bias b ← b + W·z), then scale the now symmetric range
  (the same α formula; OS+'s own search of s needs a quantizer, and rewrites know nothing of formats).
  RMSNorm has no β to absorb z, so on RMSNorm models (Llama, Qwen2, GPT-2 after rmsnorm) OS+ only scales.

Post-LN BERT has no such norm group (its LayerNorm output is also the residual), so both refuse it; the
value -> output projection pair of every attention can be smoothed exactly in any family (smooth_values).

Statistics are per linear module name (as lighten.algorithms.activations.collect_input_stats keys them): a
tensor [in_features] of that linear's input, collected on the model as it is when the rewrite runs. The
final norm (lm_head) is left alone, as lighten does not quantize lm_head by default.
"""

import torch
from torch import Tensor, nn

from lighten.errors import ModelError
from lighten.models.arch import NormGroup, model_view, norm_gain, set_norm_gain, value_proj, weight_out_in
from lighten.surgery.fold import pre_norm_view


def smooth_quant(model: nn.Module, act_absmax: dict[str, Tensor], alpha: float = 0.5) -> nn.Module:
    """SmoothQuant every block's norm groups; `act_absmax[linear name]` = max |input| per input channel."""
    for group in _block_groups(model, "smooth_quant"):
        s = _smoothing_scales(_stat(act_absmax, group, torch.amax), _column_absmax(group), alpha)
        scale_norm_group(group, s)
    return model


def outlier_suppression_plus(
    model: nn.Module, act_min: dict[str, Tensor], act_max: dict[str, Tensor], alpha: float = 0.5
) -> nn.Module:
    """OS+ on every block's norm groups: shift by the channel range centres where the norm has a β and
    every reader a bias (LayerNorm models), then scale the ranges as SmoothQuant does."""
    for group in _block_groups(model, "outlier_suppression_plus"):
        lo, hi = _stat(act_min, group, torch.amin), _stat(act_max, group, torch.amax)
        if getattr(group.norm, "bias", None) is not None and all(
            m.bias is not None for m in group.linears.values()
        ):
            z = (hi + lo) / 2
            _shift(group, z)
            lo, hi = lo - z, hi - z
        scale_norm_group(group, _smoothing_scales(torch.maximum(hi, -lo), _column_absmax(group), alpha))
    return model


@torch.no_grad()
def smooth_values(model: nn.Module, act_absmax: dict[str, Tensor], alpha: float = 0.5) -> nn.Module:
    """SmoothQuant between each attention's values and its output projection, whose input it smooths.

    Attention only mixes tokens, never channels, so dividing value channel j by s_j (v rows and bias) divides
    channel j of the attention output by s_j, and the output projection's column j ← ·s_j restores it. This
    is exact in every family, post-LN BERT included (nothing here touches a norm or the residual). With
    grouped-query attention the q heads that read one KV head share its scales."""
    view = model_view(model)
    kv, hd = view.num_kv_heads, view.head_dim

    def per_kv_channel(t: Tensor) -> Tensor:  # o input channel h·hd + c; q head h reads KV head h // group
        return t.float().cpu().reshape(kv, -1, hd).amax(dim=1)

    for block in view.blocks:
        name, out = block.attn_out
        w_out = weight_out_in(out)
        x = per_kv_channel(_inputs(act_absmax, [name])[0])
        s = _smoothing_scales(x, per_kv_channel(w_out.abs().amax(dim=0)), alpha).to(w_out.device)
        v, rows = value_proj(view, block)
        w_v = weight_out_in(v)
        w_v[rows] = (w_v[rows].float() / s.flatten()[:, None]).to(w_v.dtype)
        if v.bias is not None:
            v.bias[rows] = v.bias[rows].float() / s.flatten()
        w_out.copy_((w_out.float().unflatten(1, (kv, -1, hd)) * s[:, None, :]).flatten(1))
    return model


def _block_groups(model: nn.Module, rewrite: str) -> list[NormGroup]:
    view = pre_norm_view(
        model,
        f"apply {rewrite} to",
        "What can be smoothed exactly there is each attention's value -> output projection pair: "
        "smooth_values(model, act_absmax)",
    )
    return [g for b in view.blocks for g in (b.attn, b.mlp)]


def _inputs(stats: dict[str, Tensor], names: list[str]) -> list[Tensor]:
    missing = [name for name in names if name not in stats]
    if missing:
        raise ModelError(
            f"no activation statistics for {', '.join(missing)}: collect them on this model after the "
            "preceding rewrites (lighten.algorithms.activations.collect_input_stats)"
        )
    return [stats[name] for name in names]


def _stat(stats: dict[str, Tensor], group: NormGroup, reduce) -> Tensor:
    """One per-channel statistic for the group's input, reduced over its readers (which all see it)."""
    return reduce(torch.stack([t.float().cpu() for t in _inputs(stats, list(group.linears))]), dim=0)


def _column_absmax(group: NormGroup) -> Tensor:
    """max |W_ij| over the rows of every reader: the weight side of the smoothing balance."""
    w = torch.stack([weight_out_in(m).detach().abs().amax(dim=0).float() for m in group.linears.values()])
    return w.amax(dim=0).cpu()


def _smoothing_scales(absmax: Tensor, w: Tensor, alpha: float) -> Tensor:
    s = absmax.pow(alpha) / w.pow(1 - alpha)
    # A channel never active in calibration (or with all-zero weights) has no ratio to balance: keep it.
    return torch.where((absmax > 0) & (w > 0), s, torch.ones_like(s))


@torch.no_grad()
def scale_norm_group(group: NormGroup, s: Tensor) -> None:
    """Divide the norm's output channel j by s_j (γ and β) and multiply input column j of each reader by
    s_j: exact in a pre-norm group, whose norm output only its readers see. Computed in fp32, rounded once
    to each parameter's dtype. SmoothQuant, OS+ and AWQ fold their scales with this."""
    s = s.to(group.norm.weight.device)
    set_norm_gain(group.norm, norm_gain(group.norm) / s)
    if getattr(group.norm, "bias", None) is not None:
        group.norm.bias.copy_(group.norm.bias.float() / s)
    for linear in group.linears.values():
        w = weight_out_in(linear)
        w.copy_(w.float() * s)


@torch.no_grad()
def _shift(group: NormGroup, z: Tensor) -> None:
    z = z.to(group.norm.weight.device)
    group.norm.bias.copy_(group.norm.bias.float() - z)
    for linear in group.linears.values():
        linear.bias.copy_(linear.bias.float() + weight_out_in(linear).float() @ z)
