"""Hadamard matrices (entries ±1, H·Hᵀ = n·I) and the random orthogonal rotations built from them.

Constructions: Sylvester (H_2 ⊗ H_n), Paley I (order q+1 for a prime q ≡ 3 mod 4: 4, 8, 12, 20, 24, 32, 44,
48, 60, 72, ...) and Kronecker products of those: every power of two and e.g. 576 = 4·12·12, 1536 = 128·12,
896 = 4·224 (Paley 223), 11008 = 2·5504 (Paley 5503: exact but a large dense factor). Orders with no
construction here (28, 36, 52, ...; then 56 = 2·28, ...) get a seeded random orthogonal matrix instead:
just as exact, but dense, with no fast transform.

A Kronecker product is applied factor by factor (x·(A⊗B) = Aᵀ·X·B with X the [a, b] reshape of x), so a
rotation of order n costs n·(a + b + ...) multiply-adds per vector instead of n²: 576·60 rather than 576².
"""

import functools
import warnings

import torch
from torch import Tensor, nn

FACTOR_LIMIT = 128  # Sylvester factors H_2 are merged up to this order: fewer, larger matmuls


class Rotation(nn.Module):
    """x ↦ x·Q for the orthogonal Q = scale·(F_1 ⊗ F_2 ⊗ ...)·diag(signs), without forming Q. The factors
    are ±1 Hadamard matrices (scale 1/√n), exact in any dtype the model is cast to, or one dense random
    orthogonal matrix (scale 1); the product is computed in float32 and rounded once to x's dtype."""

    def __init__(self, factors: list[Tensor], signs: Tensor, scale: float):
        super().__init__()
        self.sizes, self.scale = [len(f) for f in factors], scale
        for i, f in enumerate(factors):
            self.register_buffer(f"factor{i}", f)
        self.register_buffer("signs", signs)

    def forward(self, x: Tensor) -> Tensor:
        shape, lead = x.shape, x.dim() - 1
        y = x.float().reshape(*shape[:-1], *self.sizes)
        for i in range(len(self.sizes)):
            f = getattr(self, f"factor{i}").float()
            y = (y.movedim(lead + i, -1) @ f).movedim(-1, lead + i)
        return (y.reshape(shape) * (self.signs.float() * self.scale)).to(x.dtype)

    def matrix(self) -> Tensor:
        return self(torch.eye(len(self.signs), device=self.signs.device))


def hadamard_matrix(n: int) -> Tensor | None:
    """A ±1 float32 matrix H of order n with H·Hᵀ = n·I, or None if none of our constructions reaches n."""
    factors = _factors(n)
    if factors is None:
        return None
    return functools.reduce(torch.kron, factors, torch.ones(1, 1))


def random_rotation(n: int, seed: int = 0) -> Rotation:
    """The orthogonal Q = H·diag(±1)/√n with seeded random signs (QuaRot's randomized Hadamard) or, if no
    Hadamard matrix of order n is constructible here, a seeded random orthogonal matrix (and a warning)."""
    g = torch.Generator().manual_seed(seed)
    factors = _factors(n)
    if factors is None:
        warnings.warn(
            f"no Hadamard matrix of order {n}: rotating by a random orthogonal matrix", stacklevel=2
        )
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return Rotation([(q * torch.sign(torch.diagonal(r))).float()], torch.ones(n), 1.0)  # sign fix: Haar
    merged = []
    for f in factors:
        if merged and len(merged[-1]) * len(f) <= FACTOR_LIMIT:
            merged[-1] = torch.kron(merged[-1], f)
        else:
            merged.append(f)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return Rotation(merged, signs, n**-0.5)


def _factors(n: int) -> list[Tensor] | None:
    """±1 matrices whose Kronecker product is a Hadamard matrix of order n; None without a construction."""
    orders = _orders(n)
    return None if orders is None else [_sylvester2() if o == 2 else _paley(o - 1) for o in orders]


@functools.cache
def _orders(n: int) -> tuple[int, ...] | None:
    """The orders of the factors (2 for H_2, q+1 for Paley I): among all our constructions of order n, the
    one whose largest factor is smallest, as it is the cheapest to apply; Sylvester on ties."""
    if n == 1:
        return ()
    if n == 2 or n % 4:
        return (2,) if n == 2 else None  # orders above 2 are multiples of 4
    candidates = [(2, *half)] if (half := _orders(n // 2)) is not None else []
    for d in range(4, n // 2 + 1, 4):
        if n % d == 0 and (a := _orders(d)) is not None and (b := _orders(n // d)) is not None:
            candidates.append(a + b)
    if _is_prime(n - 1):
        candidates.append((n,))
    return min(candidates, key=max, default=None)


def _sylvester2() -> Tensor:
    return torch.tensor([[1.0, 1.0], [1.0, -1.0]])


def _paley(q: int) -> Tensor:
    """Paley construction I: H = I + S, S = [[0, 1ᵀ], [-1, Q]] with Q the Jacobsthal matrix χ(j - i) of the
    Legendre symbol χ mod q; for q ≡ 3 mod 4, Q is skew-symmetric, Q·Qᵀ = q·I - J and Q·1 = 0."""
    squares = {i * i % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)])
    idx = torch.arange(q)
    s = torch.zeros(q + 1, q + 1)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = chi[(idx[None, :] - idx[:, None]) % q]
    return s + torch.eye(q + 1)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(n**0.5) + 1))
