"""The Lanczos process building block."""

import numpy as np
import pytest
import torch

from hessian_eigenthings import MatrixOperator
from hessian_eigenthings.solvers.krylov import lanczos_tridiagonal
from helpers import planted_matrix


def test_lanczos_relation_and_orthogonality():
    a, lam, _ = planted_matrix(list(np.linspace(-3, 5, 80)), seed=1)
    op = MatrixOperator(a)
    start = torch.randn(80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    dec = lanczos_tridiagonal(op, start, 30)
    q, t = dec.basis, dec.tridiagonal()
    assert dec.num_steps == 30 and dec.num_products == 30 and q.shape == (80, 30)
    assert torch.allclose(q.T @ q, torch.eye(30, dtype=torch.float64), atol=1e-13)
    e_m = torch.zeros(30, dtype=torch.float64)
    e_m[-1] = 1
    assert torch.allclose(a @ q, q @ t + torch.outer(dec.residual, e_m), atol=1e-12)
    assert torch.allclose(q[:, 0], start / start.norm(), atol=1e-15)


def test_full_run_recovers_the_spectrum_and_extremes_converge_first():
    spectrum = list(np.linspace(-3, 5, 60))
    a, lam, _ = planted_matrix(spectrum, seed=2)
    op = MatrixOperator(a)
    start = torch.randn(60, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = lanczos_tridiagonal(op, start, 60)
    assert torch.allclose(torch.linalg.eigvalsh(full.tridiagonal()), lam.sort().values, atol=1e-10)
    short = torch.linalg.eigvalsh(lanczos_tridiagonal(op, start, 25).tridiagonal())
    assert abs(float(short[-1]) - 5.0) < 1e-4 and abs(float(short[0]) + 3.0) < 1e-4


def test_breakdown_on_invariant_subspace():
    a, _, _ = planted_matrix([1.0] * 20 + [2.0] * 20 + [7.0] * 20, seed=3)
    start = torch.randn(60, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dec = lanczos_tridiagonal(MatrixOperator(a), start, 10)
    assert dec.num_steps == 3
    assert torch.allclose(torch.linalg.eigvalsh(dec.tridiagonal()), torch.tensor([1.0, 2.0, 7.0], dtype=torch.float64))


def test_without_basis_and_bad_arguments():
    a, _, _ = planted_matrix(list(range(1, 31)), seed=4)
    op = MatrixOperator(a)
    start = torch.ones(30, dtype=torch.float64)
    dec = lanczos_tridiagonal(op, start, 8, reorthogonalize=False, keep_basis=False)
    assert dec.basis is None and dec.num_steps == 8
    with pytest.raises(ValueError, match="keep_basis"):
        lanczos_tridiagonal(op, start, 8, reorthogonalize=True, keep_basis=False)
    with pytest.raises(ValueError, match="num_steps"):
        lanczos_tridiagonal(op, start, 31)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos_tridiagonal(op, torch.zeros(30, dtype=torch.float64), 3)
