"""Norms with statistics over the batch, which at run time are constants: a trained model's norm is then a
per-channel affine map that folds into the next linear layer (PowerNorm, as its authors run it, keeps a
per-token RMS scaling in front). Naive BatchNorm fails in transformers because the batch statistics of text
swing from step to step; each of these tames that swing its own way.

    PowerNorm    Shen et al. 2020: divide by a running quadratic mean (no centring), used in the forward
                 pass, with an approximate backward through it
    UnifiedNorm  Yang et al. 2022 (UN): divide by the geometric mean of the last few batches' quadratic
                 means, and smooth the backward's statistic over the same window
    RepBN        SLAB (Guo et al. 2024): BatchNorm(x) + η·x, η learnable
    PRepBN       SLAB's progressive replacement: λ·LayerNorm(x) + (1-λ)·RepBN(x), λ from 1 down to 0

All take [..., channels] and pool statistics over every other dimension (the batch's tokens)."""

import torch
from torch import nn


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class _ApproxScale(torch.autograd.Function):
    """z = x / s, s a per-channel constant of this step, with the approximate backward of PowerNorm and UN:
    dL/dx = (dL/dz - ν·z) / s, where ν = smoothed(dL/dz, z) is the norm's running average of
    mean(dL/dz · z) (each row a token). The exact gradient of a batch-statistic norm subtracts this step's
    mean(dL/dz · z) instead, which swings with the batch."""

    @staticmethod
    def forward(ctx, x, scale, smoothed):
        z = x / scale
        ctx.save_for_backward(z, scale)
        ctx.smoothed = smoothed
        return z

    @staticmethod
    def backward(ctx, gz):
        z, scale = ctx.saved_tensors
        nu = ctx.smoothed(_rows(gz), _rows(z))
        return (gz - nu * z) / scale, None, None


class PowerNorm(nn.Module):
    """Power Normalization as the authors' code runs it in transformers: each token is first divided by its
    root mean square over the channels (their GroupScaling1D with one group), then each channel by the
    running quadratic mean ψ² of the batches before (during `warmup` steps, by this batch's own), with the
    approximate backward above: ν ← ν·(1 - (1-α_b)·mean(z²)) + (1-α_b)·mean(dL/dz·z) (the paper's
    Algorithm 1). After each training step ψ² ← α_f·ψ² + (1-α_f)·mean(x²). Evaluation divides by ψ: fixed
    per channel."""

    def __init__(
        self, dim: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9, warmup: int = 0
    ):
        super().__init__()
        self.dim, self.eps, self.alpha_fwd, self.alpha_bkw, self.warmup = (
            dim,
            eps,
            alpha_fwd,
            alpha_bkw,
            warmup,
        )
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_phi", torch.ones(dim))  # ψ²
        self.register_buffer("nu", torch.zeros(dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # per token, over the channels
        if not self.training:
            return self.weight * x * torch.rsqrt(self.running_phi + self.eps) + self.bias
        self.steps += 1
        x2 = _rows(x).detach().pow(2).mean(0)
        phi = x2 if self.steps <= self.warmup else self.running_phi.clone()
        z = _ApproxScale.apply(x, torch.sqrt(phi + self.eps), self._smoothed)
        self.running_phi.mul_(self.alpha_fwd).add_((1 - self.alpha_fwd) * x2)
        return self.weight * z + self.bias

    def _smoothed(self, gz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ν of the steps before (for this step's gradient), then ν ← ν·(1 - a·mean(z²)) + a·mean(gz·z)."""
        a, used = 1 - self.alpha_bkw, self.nu.clone()
        self.nu.mul_(1 - a * z.pow(2).mean(0)).add_(a * (gz * z).mean(0))
        return used

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}"


class UnifiedNorm(nn.Module):
    """Unified Normalization (UN) for language, as its authors configure it there (no outlier filtration):
    in training each channel is divided by the geometric mean of the quadratic means mean(x²) of the last
    `window` batches (this batch's own until the window is full and `warmup` steps have passed), and the
    backward subtracts ν·z, ν an exponential average (momentum) of the window's mean of mean(dL/dz·z): the
    same smoothing for the gradient statistic. The running quadratic mean that evaluation divides by is an
    exponential average of the forward's. (The authors also rescale the backward by the ratio of this
    step's statistic to the running one, clipped to [1/5, 5], after 1000 steps; not done here.)"""

    def __init__(self, dim: int, eps: float = 1e-5, window: int = 4, momentum: float = 0.9, warmup: int = 0):
        super().__init__()
        self.dim, self.eps, self.window, self.momentum, self.warmup = dim, eps, window, momentum, warmup
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.register_buffer("nu", torch.zeros(dim))
        self.register_buffer("recent_x2", torch.ones(window, dim))  # forward statistics, a ring
        self.register_buffer("recent_gz", torch.zeros(window, dim))  # backward statistics, a ring
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.weight * x * torch.rsqrt(self.running_var + self.eps) + self.bias
        self.steps += 1
        x2 = _rows(x).detach().pow(2).mean(0)
        self.recent_x2[self.steps % self.window] = x2
        var = x2 if not self._smoothing() else self.recent_x2.log().mean(0).exp()
        z = _ApproxScale.apply(x, torch.sqrt(var + self.eps), self._smoothed)
        self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var)
        return self.weight * z + self.bias

    def _smoothing(self) -> bool:
        return bool(self.steps > max(self.window, self.warmup))

    def _smoothed(self, gz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ν ← momentum·ν + (1 - momentum)·(the window's mean of mean(gz·z)), used for this step."""
        self.recent_gz[self.steps % self.window] = (gz * z).mean(0)
        window_mean = (
            self.recent_gz.mean(0) if self._smoothing() else self.recent_gz[self.steps % self.window]
        )
        self.nu.mul_(self.momentum).add_((1 - self.momentum) * window_mean)
        return self.nu.clone()

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, window={self.window}, momentum={self.momentum}"


class RepBN(nn.Module):
    """BatchNorm over the tokens plus η·x (η one learnable scalar, 1 at first): the identity path keeps
    training stable where BatchNorm alone collapses. In evaluation it is one per-channel affine map."""

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, eps=eps, momentum=momentum)
        self.eta = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(_rows(x)).reshape(x.shape) + self.eta * x


class PRepBN(nn.Module):
    """Progressive RepBN: λ·LayerNorm(x) + (1-λ)·RepBN(x), λ = 1 for `warmup` training steps, then falling
    linearly to 0 over `decay` more. Evaluation computes the same mixture at the λ training reached (0 at
    the end, where the norm is RepBN alone)."""

    def __init__(self, dim: int, warmup: int, decay: int, eps: float = 1e-5):
        super().__init__()
        self.warmup, self.decay = warmup, decay
        self.layernorm = nn.LayerNorm(dim, eps=eps)
        self.repbn = RepBN(dim, eps)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def lam(self) -> float:
        past = int(self.steps) - self.warmup
        return 1.0 if past <= 0 else max(0.0, 1.0 - past / max(self.decay, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
        lam = self.lam()
        if lam == 0.0:
            return self.repbn(x)
        # RepBN runs from the first step (its running statistics warm up while λ = 1)
        return lam * self.layernorm(x) + (1 - lam) * self.repbn(x)
