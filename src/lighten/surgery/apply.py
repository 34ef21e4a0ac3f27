"""apply_surgery: the named rewrites of SURGERY_STEPS, checked and run in their order."""

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from lighten.errors import LightenError
from lighten.surgery import SURGERY_STEPS
from lighten.surgery.fold import fold_norm_affine
from lighten.surgery.rmsnorm import layernorm_to_rmsnorm
from lighten.surgery.rotate import rotate_residual_hadamard
from lighten.surgery.smooth import outlier_suppression_plus, smooth_quant

Stats = Callable[[nn.Module], Mapping[str, Any]]  # module name -> record with .absmax, .min, .max

# Steps that do the same job in two ways: a model takes at most one of each pair.
ALTERNATIVES = {
    ("rotate", "rotate_fused"): "both rotate the residual stream (rotate_fused is rotate without the online "
    "Hadamard)",
    ("smooth", "osplus"): "both rescale the same channels",
}


def apply_surgery(model: nn.Module, steps: list[str], stats: Stats | None = None) -> nn.Module:
    """Apply `steps` (names of SURGERY_STEPS, in that order; at most one of each of ALTERNATIVES) in place.

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
    for (a, b), why in ALTERNATIVES.items():
        if a in steps and b in steps:
            raise LightenError(f"choose one of {a} and {b}: {why}")
    if ("smooth" in steps or "osplus" in steps) and stats is None:
        raise LightenError("smooth/osplus need activation statistics from calibration text")
    for step in steps:
        if step == "fold":
            fold_norm_affine(model)
        elif step == "rmsnorm":
            layernorm_to_rmsnorm(model)
        elif step == "rotate":
            rotate_residual_hadamard(model)
        elif step == "rotate_fused":
            rotate_residual_hadamard(model, online=False)
        elif step == "smooth":
            smooth_quant(model, {name: r.absmax for name, r in stats(model).items()})
        else:
            records = stats(model)
            lo, hi = ({name: getattr(r, key) for name, r in records.items()} for key in ("min", "max"))
            outlier_suppression_plus(model, lo, hi)
    return model
