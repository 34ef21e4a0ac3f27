"""Exact model surgery: rewrites of a loaded model's weights (and, for online Hadamards, a few small
modules) that leave its outputs unchanged up to float rounding and make it easier to quantize.

    apply_surgery(model, ["fold", "rotate"])           # QuaRot-style, Llama family
    apply_surgery(model, ["fold", "rotate_fused"])     # the same without the online transform: GGUF-ready
    apply_surgery(model, ["fold", "rmsnorm", "rotate"])  # GPT-2
    apply_surgery(model, ["fold", "smooth"], stats=lambda m: collect_input_stats(m, tokenizer, texts))

Every rewrite works in place and returns the model. None knows anything about number formats.
Two exact rewrites are functions only, not steps: smooth_values (value -> output projection smoothing, the
one smoothing exact on post-LN BERT) and compress_rmsnorm (Pre-CRMSNorm, GPT-2; in memory only).
"""

import importlib

# In the only order they can be applied: smoothing leaves gains ≠ 1, which folding would undo and rotation
# cannot pass through; rotation needs RMSNorm; RMSNorm needs folded norms. rotate and rotate_fused are
# alternatives (one rotation of the residual stream, with or without the online transform), as are smooth
# and osplus.
SURGERY_STEPS = {
    "fold": "move each pre-norm's gain/bias into the linears that read it (unties a tied lm_head)",
    "rmsnorm": "GPT-2: center the residual stream and replace LayerNorm by RMSNorm (Pre-RMSNorm)",
    "rotate": "QuaRot: random Hadamard rotation of the residual, online Hadamard before down_proj, per head",
    "rotate_fused": "rotate without the online Hadamard: every rotation fused into the weights (GGUF-ready)",
    "smooth": "SmoothQuant: per-channel scales moving activation outliers of each norm's output into weights",
    "osplus": "Outlier Suppression+: per-channel shift (LayerNorm only) and scale of each norm's output",
}

# The rewrites, loaded on first use: recipes check step names against SURGERY_STEPS without importing torch.
_EXPORTS = {
    "apply_surgery": "apply",
    "compress_rmsnorm": "rmsnorm",
    "layernorm_to_rmsnorm": "rmsnorm",
    "fold_norm_affine": "fold",
    "untie_lm_head": "fold",
    "Rotation": "hadamard",
    "hadamard_matrix": "hadamard",
    "random_rotation": "hadamard",
    "restore_input_rotations": "rotate",
    "rotate_residual_hadamard": "rotate",
    "outlier_suppression_plus": "smooth",
    "scale_norm_group": "smooth",
    "smooth_quant": "smooth",
    "smooth_values": "smooth",
}
__all__ = ["SURGERY_STEPS", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lighten.surgery.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lighten.surgery' has no attribute {name!r}")
