"""Norms of each token on its own (no statistics across tokens): what a trained model computes at run time
exactly as in training. torch has LayerNorm and RMSNorm; these are the seeds' variants.

    CRMSNorm            Pre-CRMSNorm (Jiang et al. 2023): RMSNorm of a zero-mean d-vector kept as d-1 numbers
    SingleScaleRMSNorm  Outlier-Safe Pre-Training (Park et al. 2025): RMSNorm with one gain for all channels,
                        so no channel can be amplified on its own
    DepthScaled         LayerNorm Scaling (Sun et al., "The Curse of Depth", 2025): a norm's output times
                        1/sqrt(l) in layer l (1-based), against the variance Pre-LN piles up with depth
"""

import math

import torch
from torch import nn


class CRMSNorm(nn.Module):
    """Compressed RMSNorm: x holds the first d-1 coordinates of a zero-mean d-vector whose last one is -Σx;
    normalizes that vector (its mean square is (Σx² + (Σx)²) / d) and returns it in the same d-1 form."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_square = (x.pow(2).sum(-1, keepdim=True) + x.sum(-1, keepdim=True).pow(2)) / self.dim
        return x * torch.rsqrt(mean_square + self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim} -> {self.dim - 1}, eps={self.eps}"


class SingleScaleRMSNorm(nn.Module):
    """x / rms(x) · g with one learnable g: the per-channel gains of RMSNorm are where training grows
    outlier channels (OSP), and a single gain cannot single any channel out."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, one gain, eps={self.eps}"


class DepthScaled(nn.Module):
    """LayerNorm Scaling: `norm`'s output divided by sqrt(depth), the 1-based index of its layer."""

    def __init__(self, norm: nn.Module, depth: int):
        super().__init__()
        if depth < 1:
            raise ValueError(f"layers are counted from 1, got depth {depth}")
        self.norm, self.depth = norm, depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) / math.sqrt(self.depth)

    def extra_repr(self) -> str:
        return f"× 1/sqrt({self.depth})"
