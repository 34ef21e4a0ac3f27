"""Shared by the surgery tests: norms worth folding, a reference output, and input statistics by hooks."""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lighten.models.arch import model_view, norm_groups

TOL = 1e-4  # fp32: max |Δ| ≤ TOL × max |reference output|


def randomize_norms(model: nn.Module, seed: int = 0, outliers: float = 8.0) -> nn.Module:
    """Random-init models have γ=1, β=0; give every norm a random gain and bias, and a few outlier channels
    (gain × `outliers`) so there is something for smoothing and rotation to flatten."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in norm_groups(model_view(model)):
            w = group.norm.weight
            w.copy_(1 + 0.3 * torch.randn(w.shape, generator=g))
            w[torch.randperm(w.numel(), generator=g)[:3]] *= outliers
            if getattr(group.norm, "bias", None) is not None:
                group.norm.bias.copy_(0.5 * torch.randn(w.shape, generator=g) + 1.0)
    return model


def token_ids(vocab: int, n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same(model: nn.Module, ids: torch.Tensor, reference: torch.Tensor, label: str) -> float:
    """The model's output equals `reference` within TOL; returns (and prints) the relative max |Δ|."""
    rel = ((output(model, ids) - reference).abs().max() / reference.abs().max()).item()
    print(f"max|Δ|/max|ref| {label}: {rel:.2e}")
    assert rel <= TOL, f"{label}: {rel:.2e} > {TOL}"
    return rel


@torch.no_grad()
def input_stats(model: nn.Module, ids: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """{"absmax"|"min"|"max": {linear name: [in_features]}} of every Linear/Conv1D input over all tokens."""
    stats = {"absmax": {}, "min": {}, "max": {}}

    def hook(name):
        def record(module, args):
            x = args[0].flatten(0, -2).float()
            stats["absmax"][name] = x.abs().amax(0)
            stats["min"][name], stats["max"][name] = x.amin(0), x.amax(0)

        return record

    handles = [
        m.register_forward_pre_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D))
    ]
    model(ids)
    for h in handles:
        h.remove()
    return stats


def outlier_ratio(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean over the blocks' norm groups of max/median of the per-channel absmax of the group's input."""
    absmax = input_stats(model, ids)["absmax"]
    view = model_view(model)
    ratios = []
    for group in (g for b in view.blocks for g in (b.attn, b.mlp)):
        a = absmax[next(iter(group.linears))]
        ratios.append((a.max() / a.median()).item())
    return sum(ratios) / len(ratios)
