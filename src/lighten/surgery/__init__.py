"""Exact model surgery: rewrites of a loaded model's weights (and, for online Hadamards, a few small
modules) that leave its outputs unchanged up to float rounding and make it easier to quantize.

    apply_surgery(model, ["fold", "rotate"])           # QuaRot-style, Llama family
    apply_surgery(model, ["fold", "rmsnorm", "rotate"])  # GPT-2
    apply_surgery(model, ["fold", "smooth"], stats=lambda m: collect_input_stats(m, tokenizer, texts))

Every rewrite works in place and returns the model. None knows anything about number formats.
Two exact rewrites are functions only, not steps: smooth_values (value -> output projection smoothing, the
one smoothing exact on post-LN BERT) and compress_rmsnorm (Pre-CRMSNorm, GPT-2; in memory only).
"""

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from lighten.errors import LightenError
from lighten.surgery.fold import fold_norm_affine, untie_lm_head
from lighten.surgery.hadamard import Rotation, hadamard_matrix, random_rotation
from lighten.surgery.rmsnorm import CRMSNorm, compress_rmsnorm, layernorm_to_rmsnorm
from lighten.surgery.rotate import restore_input_rotations, rotate_residual_hadamard
from lighten.surgery.smooth import outlier_suppression_plus, smooth_quant, smooth_values

# In the only order they can be applied: smoothing leaves gains ≠ 1, which folding would undo and rotation
# cannot pass through; rotation needs RMSNorm; RMSNorm needs folded norms.
SURGERY_STEPS = {
    "fold": "move each pre-norm's gain/bias into the linears that read it (unties a tied lm_head)",
    "rmsnorm": "GPT-2: center the residual stream and replace LayerNorm by RMSNorm (Pre-RMSNorm)",
    "rotate": "QuaRot: random Hadamard rotation of the residual, online Hadamard before down_proj, per head",
    "smooth": "SmoothQuant: per-channel scales moving activation outliers of each norm's output into weights",
    "osplus": "Outlier Suppression+: per-channel shift (LayerNorm only) and scale of each norm's output",
}

Stats = Callable[[nn.Module], Mapping[str, Any]]  # module name -> record with .absmax, .min, .max


def apply_surgery(model: nn.Module, steps: list[str], stats: Stats | None = None) -> nn.Module:
    """Apply `steps` (names of SURGERY_STEPS, in that order; at most one of smooth/osplus) in place.

    `stats(model)` is called just before smoothing, on the model as the preceding steps left it (they change
    the activations smoothing must see); it returns, per linear module name, a record with per-input-channel
    .absmax, .min and .max, as lighten.algorithms.activations.collect_input_stats does.
    """
    order = list(SURGERY_STEPS)
    unknown = [s for s in steps if s not in SURGERY_STEPS]
    if unknown:
        raise LightenError(f"unknown surgery step(s) {', '.join(unknown)}; known: {', '.join(order)}")
    if [order.index(s) for s in steps] != sorted({order.index(s) for s in steps}):
        raise LightenError(f"surgery steps must appear at most once each, in the order {', '.join(order)}")
    if "smooth" in steps and "osplus" in steps:
        raise LightenError("choose one of smooth and osplus: both rescale the same channels")
    if ("smooth" in steps or "osplus" in steps) and stats is None:
        raise LightenError("smooth/osplus need activation statistics from calibration text")
    for step in steps:
        if step == "fold":
            fold_norm_affine(model)
        elif step == "rmsnorm":
            layernorm_to_rmsnorm(model)
        elif step == "rotate":
            rotate_residual_hadamard(model)
        elif step == "smooth":
            smooth_quant(model, {name: r.absmax for name, r in stats(model).items()})
        else:
            records = stats(model)
            lo, hi = ({name: getattr(r, key) for name, r in records.items()} for key in ("min", "max"))
            outlier_suppression_plus(model, lo, hi)
    return model


__all__ = [
    "CRMSNorm",
    "SURGERY_STEPS",
    "Rotation",
    "apply_surgery",
    "compress_rmsnorm",
    "restore_input_rotations",
    "fold_norm_affine",
    "hadamard_matrix",
    "layernorm_to_rmsnorm",
    "outlier_suppression_plus",
    "random_rotation",
    "rotate_residual_hadamard",
    "smooth_quant",
    "smooth_values",
    "untie_lm_head",
]
