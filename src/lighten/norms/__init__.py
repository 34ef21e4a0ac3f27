"""The seeds' normalization layers (paper listings 001 and 003), drop-in for a transformer's LayerNorm or
RMSNorm: make_norm(kind, dim) for each kind of NORMS. Placements (Pre-LN, Post-LN, Peri-LN, Mix-LN) and
LayerNorm Scaling (token.DepthScaled) belong to the model that uses them (lighten.lab)."""

from torch import nn

from lighten.errors import LightenError
from lighten.norms.batch import PowerNorm, PRepBN, RepBN, UnifiedNorm
from lighten.norms.token import CRMSNorm, DepthScaled, SingleScaleRMSNorm

NORMS = {
    "layernorm": "LayerNorm: centre and scale each token, per-channel gain and bias",
    "rmsnorm": "RMSNorm: scale each token by its root mean square, per-channel gain",
    "single_scale_rmsnorm": "OSP's RMSNorm with one gain for all channels",
    "powernorm": "PowerNorm: running quadratic mean over the batch, approximate backward",
    "unified": "Unified Normalization: windowed geometric mean of batch statistics, smoothed backward",
    "prepbn": "SLAB's progressive LayerNorm -> RepBN (BatchNorm + eta x) replacement",
}
__all__ = [
    "NORMS",
    "CRMSNorm",
    "DepthScaled",
    "PRepBN",
    "PowerNorm",
    "RepBN",
    "SingleScaleRMSNorm",
    "UnifiedNorm",
    "make_norm",
]


def make_norm(kind: str, dim: int, eps: float = 1e-5, steps: int = 0) -> nn.Module:
    """A `kind` norm of `dim` channels; `steps` (the training length) sets PRepBN's schedule (LayerNorm for
    the first tenth, then down to RepBN alone by 70 %: SLAB trains the rest on RepBN) and when UN starts
    smoothing its statistics over a window of batches: after the first tenth, the learning rate's warmup,
    while they change fastest (from the start, a lab model diverged at step 14: a stale small mean(x²)
    from the window blew up a fresh batch)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "single_scale_rmsnorm":
        return SingleScaleRMSNorm(dim, eps)
    if kind == "powernorm":
        return PowerNorm(dim, eps)
    if kind == "unified":
        return UnifiedNorm(dim, eps, warmup=steps // 10)
    if kind == "prepbn":
        return PRepBN(dim, warmup=steps // 10, decay=steps * 6 // 10, eps=eps)
    raise LightenError(f"unknown norm {kind!r}; known: {', '.join(NORMS)}")
