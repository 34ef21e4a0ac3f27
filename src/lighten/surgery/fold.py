"""Folding each norm's affine (γ, β) into the linear layers that read the norm.

A pre-norm block computes W·(γ⊙n + β) + b with n the normalized input, which equals (W·diag(γ))·n + (b + W·β):
the norm can keep only its normalization (γ=1, β=0) and the linears absorb the rest. Rotations need this
(RMSNorm commutes with an orthogonal matrix only without a per-channel gain), and smoothing starts from it.
"""

import torch
from torch import nn

from lighten.errors import ModelError
from lighten.models.arch import (
    ModelView,
    NormGroup,
    model_view,
    norm_gain,
    norm_groups,
    set_norm_gain,
    weight_out_in,
)

POST_NORM = (
    "BERT-style models are post-LN: each LayerNorm's output is both the input of the next linears and the "
    "residual stream itself, which the next LayerNorm normalizes again. Moving γ/β into the linears would "
    "leave the residual without them, and LayerNorm is not invariant to per-channel scales or shifts, so "
    "no norm of a post-LN model can be folded (or smoothed, or rotated) exactly by rewriting weights"
)


def fold_norm_affine(model: nn.Module) -> nn.Module:
    """Move every norm's γ (and LayerNorm's β) into the linears that read it; the norms end with γ=1, β=0.

    W ← W·diag(γ) and b ← b + W·β for each reader, including the final norm into lm_head. A lm_head tied to
    the token embedding is untied first (its own copy of the weight, config.tie_word_embeddings=False),
    since only the head takes the final γ. GPT-2's lm_head has no bias, so ln_f's β becomes a new lm_head
    bias (exact in this model; Hugging Face's GPT2LMHeadModel does not load that bias back from a checkpoint).

    What can and cannot be folded: every norm of a pre-norm model (GPT-2, Llama/Qwen2/Mistral, and Gemma's
    pre-norms, whose gain is 1 + w: their w becomes 0) folds exactly, except the final norm of a base model
    without lm_head (its output is the model's output, so it keeps its γ/β), and Gemma's norms on the
    sub-layers' outputs (no linear reads them: they keep their gains); no norm of a post-LN model (BERT)
    does, and this raises ModelError saying why, changing nothing.
    """
    view = pre_norm_view(model, "fold norms of")
    untie_lm_head(model)
    with torch.no_grad():
        for group in norm_groups(view):
            if group.linears:
                _fold(group)
    return model


OUTPUT_NORMS_ONLY = (
    "OLMo-2 has no norm before its sub-layers: q, k, v and gate, up read the residual stream itself, and "
    "its norms sit on the sub-layers' outputs (post_attention_layernorm, post_feedforward_layernorm), "
    "where no linear reads them, so there is no norm affine to fold, scale or rotate past"
)


def pre_norm_view(model: nn.Module, action: str, advice: str = "") -> ModelView:
    """The model's view; on a model without pre-norms (post-LN, OLMo-2), ModelError "cannot <action>
    <model class>" saying why."""
    view = model_view(model)
    if not view.pre_norm:
        why = OUTPUT_NORMS_ONLY if view.family == "olmo2" else POST_NORM
        raise ModelError(f"cannot {action} {type(model).__name__}: {why}. {advice}".rstrip())
    return view


def untie_lm_head(model: nn.Module) -> None:
    """Give a lm_head that shares the token embedding's weight its own copy, so a rewrite of one is not
    also applied to the other; config.tie_word_embeddings=False keeps save/load from tying them again."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embedding.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False


def _fold(group: NormGroup) -> None:
    gamma = norm_gain(group.norm)  # γ, or Gemma's 1 + w
    beta = getattr(group.norm, "bias", None)
    for name, linear in group.linears.items():
        w = weight_out_in(linear)
        if beta is not None and beta.any():
            shift = w.float() @ beta.float()  # uses W before the γ scaling: W·(γ⊙n + β) = (W·γ)·n + W·β
            if linear.bias is not None:
                linear.bias += shift.to(linear.bias.dtype)
            elif isinstance(linear, nn.Linear):
                linear.bias = nn.Parameter(shift.to(w.dtype))
            else:
                raise ModelError(f"cannot fold the β of {group.name} into {name}: it has no bias to take it")
        w.copy_(w.float() * gamma)
    set_norm_gain(group.norm, torch.ones_like(gamma))
    if beta is not None:
        beta.zero_()


def require_folded(view: ModelView, rewrite: str) -> None:
    """ModelError unless every norm has γ=1 (and β=0): `rewrite` is only exact on folded norms."""
    if view.final is not None and not view.final.linears:
        raise ModelError(
            f"{rewrite} needs a model with its language-model head: the final norm {view.final.name} "
            "reads nothing but is the output itself, so its γ/β cannot be folded away"
        )
    for group in norm_groups(view):
        beta = getattr(group.norm, "bias", None)
        if not (norm_gain(group.norm) == 1).all() or (beta is not None and beta.any()):
            raise ModelError(
                f"{rewrite} needs folded norms, but {group.name} still has its own gain/bias: "
                "run fold_norm_affine first (--surgery fold,...), and smoothing only after it"
            )
