"""apply_surgery: the named rewrites of SURGERY_STEPS, checked and run in their order, each one's output
checked against the model's before any of them (an exact rewrite changes nothing but float rounding)."""

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lighten.errors import LightenError
from lighten.surgery import SURGERY_STEPS
from lighten.surgery.fold import fold_norm_affine
from lighten.surgery.rmsnorm import layernorm_to_rmsnorm
from lighten.surgery.rotate import rotate_residual_hadamard
from lighten.surgery.smooth import outlier_suppression_plus, smooth_quant

Stats = Callable[[nn.Module], Mapping[str, Any]]  # module name -> record with .absmax, .min, .max

CHECK_TOKENS = 16  # the probe: this many token ids, seeded, the same every time
# max |output after - output before| ≤ tolerance × max |output before|, by the model's dtype: exact
# rewrites measure ~1e-6 in fp32 (tests); one that computes something else moves outputs by their own size.
EXACT_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
HALF_TOLERANCE = 3e-2  # bf16 / fp16

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

    Exact means checked: after each step the model's output (logits; an encoder's last hidden states) on a
    fixed probe of CHECK_TOKENS token ids must equal the output before surgery within EXACT_TOLERANCE. A step
    that moves it further (a family whose norms or residuals the rewrite does not understand) is a
    LightenError naming the step and the model type, and the model is left as it was.
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
    if not steps:
        return model
    # The steps rewrite a copy, which replaces the model's insides only once every step has passed the
    # check: a refused rewrite leaves the model, and every reference into it, untouched.
    work, probe = copy.deepcopy(model), _probe(model)
    reference = _output(model, probe)
    for step in steps:
        _apply(work, step, stats)
        moved = _moved(_output(work, probe), reference)
        tolerance = EXACT_TOLERANCE.get(reference.dtype, HALF_TOLERANCE)
        if not moved <= tolerance:  # NaN too
            kind = getattr(model.config, "model_type", type(model).__name__)
            raise LightenError(
                f"surgery step {step!r} is not exact on this {kind} model: it moved the outputs by "
                f"{moved:.1e} of their largest (tolerance {tolerance:.0e}); the model is left as it was"
            )
    model.__dict__.clear()  # every module, parameter, buffer and hook of the rewritten copy
    model.__dict__.update(work.__dict__)
    return model


def _apply(model: nn.Module, step: str, stats: Stats | None) -> None:
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


def _probe(model: nn.Module) -> torch.Tensor:
    """[1, CHECK_TOKENS] token ids, seeded: any input shows a rewrite that computes something else."""
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(vocab, (1, CHECK_TOKENS), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids.to(model.device))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _moved(after: torch.Tensor, before: torch.Tensor) -> float:
    return ((after.double() - before.double()).abs().max() / before.double().abs().max()).item()
