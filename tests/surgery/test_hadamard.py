"""Hadamard constructions: H·Hᵀ = n·I with ±1 entries; rotations are orthogonal."""

import pytest
import torch

from lighten.surgery import hadamard_matrix, random_rotation


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 64, 72, 576, 768, 896, 1536, 2048, 4096])
def test_hadamard_orthogonal_rows(n):
    h = hadamard_matrix(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    rows = torch.arange(0, n, max(1, n // 512))  # all rows up to n=512, then a strided sample (time)
    assert torch.equal(h[rows] @ h.T, n * torch.eye(n)[rows])


def test_no_construction_is_none():
    assert hadamard_matrix(36) is None and hadamard_matrix(6) is None


@pytest.mark.parametrize("n", [64, 576, 1536])
def test_random_rotation_is_a_signed_normalized_hadamard(n):
    rotation = random_rotation(n, seed=3)
    q = rotation.matrix()
    assert torch.allclose(q @ q.T, torch.eye(n), atol=1e-5)
    # Q = H·diag(±1)/√n, applied factor by factor: same as the dense product
    assert torch.allclose(q, hadamard_matrix(n) * rotation.signs / n**0.5, atol=1e-6)
    x = torch.randn(3, 5, n)
    assert torch.allclose(rotation(x), x @ q, atol=1e-5)
    assert torch.equal(q, random_rotation(n, seed=3).matrix())
    assert not torch.equal(q, random_rotation(n, seed=4).matrix())


def test_fallback_is_a_random_orthogonal_matrix_and_says_so():
    with pytest.warns(UserWarning, match="no Hadamard matrix of order 36"):
        q = random_rotation(36).matrix()
    assert torch.allclose(q @ q.T, torch.eye(36), atol=1e-5)
