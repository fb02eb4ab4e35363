"""The Lanczos process: an orthonormal Krylov basis and the tridiagonal matrix of an operator in it.

This is the building block of spectral density estimation (stochastic Lanczos quadrature); the
native restarted eigensolvers use their own block variant (krylov_schur.py). Everything stays on the operator's device; the only host
syncs are the breakdown tests (one scalar per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..operators.base import Operator


@dataclass
class LanczosDecomposition:
    """``A Q = Q T + r e_m^T`` with T tridiagonal (``alphas`` on, ``betas`` off the diagonal).

    Attributes:
        alphas: (m,) diagonal of T.
        betas: (m - 1,) off-diagonal of T.
        basis: (n, m) orthonormal Q, or None when it was not kept.
        residual: (n,) the next, unnormalised Lanczos vector r (A Q - Q T = r e_m^T).
        num_products: operator products used (m).
    """

    alphas: Tensor
    betas: Tensor
    basis: Optional[Tensor]
    residual: Tensor
    num_products: int

    @property
    def num_steps(self) -> int:
        """m, the Lanczos steps taken: the size of the (m, m) tridiagonal matrix."""
        return int(self.alphas.shape[0])

    def tridiagonal(self) -> Tensor:
        """T as a dense (m, m) matrix."""
        t = torch.diag(self.alphas)
        if self.betas.numel():
            t = t + torch.diag(self.betas, 1) + torch.diag(self.betas, -1)
        return t


def lanczos_tridiagonal(
    operator: Operator,
    start: Tensor,
    num_steps: int,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
    breakdown_tol: Optional[float] = None,
) -> LanczosDecomposition:
    """Run ``num_steps`` steps of the Lanczos process on a symmetric operator.

    Args:
        operator: symmetric n x n operator.
        start: (n,) nonzero start vector (normalised here), on the operator's device and dtype.
        num_steps: m, the Krylov dimension wanted (at most n). Stops early on breakdown, i.e. when
            the Krylov space is invariant (the next vector is below ``breakdown_tol`` relative to
            the size of the operator seen so far); T then has exactly the eigenvalues of A on it.
        reorthogonalize: re-orthogonalise every new vector against the whole basis (two passes
            of Gram-Schmidt). Without it the basis loses orthogonality and T gets spurious copies
            of converged eigenvalues; it needs ``keep_basis``.
        keep_basis: keep the (n, m) basis (memory n * m) and return it.
        breakdown_tol: default ``n * eps`` of the dtype.

    Returns:
        A :class:`LanczosDecomposition`.
    """
    if reorthogonalize and not keep_basis:
        raise ValueError("reorthogonalize=True needs keep_basis=True (it orthogonalises against the basis).")
    n = operator.size
    num_steps = int(num_steps)
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be between 1 and the operator size n={n}, got {num_steps}.")
    if start.shape != (n,):
        raise ValueError(f"start must have shape ({n},), got {tuple(start.shape)}.")
    start = start.to(device=operator.device, dtype=operator.dtype)
    norm = torch.linalg.vector_norm(start)
    if not bool(norm > 0):
        raise ValueError("start must be a nonzero vector.")
    tol = breakdown_tol if breakdown_tol is not None else n * torch.finfo(operator.dtype).eps

    basis = torch.empty(n, num_steps, dtype=operator.dtype, device=operator.device) if keep_basis else None
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    q = start / norm
    q_prev = torch.zeros_like(q)
    beta_prev = torch.zeros((), dtype=operator.dtype, device=operator.device)
    scale = torch.zeros((), dtype=operator.dtype, device=operator.device)
    residual = torch.zeros_like(q)
    first_products = operator.num_products
    for step in range(num_steps):
        if basis is not None:
            basis[:, step] = q
        w = operator.apply(q)
        alpha = torch.dot(q, w)
        w = w - alpha * q - beta_prev * q_prev
        if reorthogonalize:
            kept = basis[:, : step + 1]
            for _ in range(2):
                w = w - kept @ (kept.T @ w)
        alphas.append(alpha)
        beta = torch.linalg.vector_norm(w)
        scale = torch.maximum(scale, alpha.abs() + beta + beta_prev)
        residual = w
        if step == num_steps - 1:
            break
        if float(beta) <= tol * float(scale):  # invariant subspace: T is exact on it
            break
        betas.append(beta)
        q_prev, q, beta_prev = q, w / beta, beta

    m = len(alphas)
    return LanczosDecomposition(
        alphas=torch.stack(alphas),
        betas=torch.stack(betas) if betas else torch.zeros(0, dtype=operator.dtype, device=operator.device),
        basis=basis[:, :m] if basis is not None else None,
        residual=residual,
        num_products=operator.num_products - first_products,
    )
