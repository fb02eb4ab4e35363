"""The Lanczos process: an orthonormal Krylov basis and the tridiagonal matrix of an operator in it.

This is the building block of spectral density estimation (stochastic Lanczos quadrature); the
native restarted eigensolvers use their own block variant (krylov_schur.py).

:func:`lanczos_tridiagonal_batch` advances several *independent* Lanczos recurrences together,
one start vector each: every step is one batched product ``A [q_1 .. q_g]`` (cheaper than g single
products for Hessian-vector products and on a GPU), while each recurrence keeps its own
coefficients, basis and re-orthogonalisation, so each gives what a run of its own would give (up to
rounding). It is not block Lanczos, whose basis is shared by the whole block. A recurrence that
breaks down leaves the block, which shrinks, so no product is spent on a finished one.
:func:`lanczos_tridiagonal` is the one-vector case.

Everything stays on the operator's device; the only host sync is the breakdown test (one small
vector per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

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
    n = operator.size
    if not isinstance(start, Tensor) or start.shape != (n,):
        shape = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"start must be a tensor of shape ({n},), got {shape}.")
    start = start.to(device=operator.device, dtype=operator.dtype)
    if not bool(torch.linalg.vector_norm(start) > 0):
        raise ValueError("start must be a nonzero vector.")
    return lanczos_tridiagonal_batch(
        operator, start.unsqueeze(1), num_steps, reorthogonalize, keep_basis, breakdown_tol
    )[0]


def lanczos_tridiagonal_batch(
    operator: Operator,
    starts: Tensor,
    num_steps: int,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
    breakdown_tol: Optional[float] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> list[LanczosDecomposition]:
    """Run g independent Lanczos processes, one per column of ``starts``, advanced together.

    Every step is one ``operator.apply_block`` of the current Lanczos vectors of the recurrences
    still running (``operator.apply`` once a single one is left). Each recurrence has its own
    coefficients, its own basis and its own re-orthogonalisation, exactly as
    :func:`lanczos_tridiagonal` on that column alone (the results agree up to rounding). One that
    breaks down (its Krylov space is invariant) stops there with fewer steps, as it would alone,
    and leaves the block: later products have one column fewer.

    Args:
        operator: symmetric n x n operator.
        starts: (n, g) start vectors, each nonzero (normalised here).
        num_steps: m, the Krylov dimension wanted for each (at most n).
        reorthogonalize: full re-orthogonalisation of each recurrence against its own basis (two
            passes of Gram-Schmidt, batched over the g bases); needs ``keep_basis``.
        keep_basis: keep the bases, memory ``g * m * n`` numbers; each result's ``basis`` is a
            (n, m_j) view into that storage. Without it, three vectors per recurrence.
        breakdown_tol: default ``n * eps`` of the dtype, relative to the size of the operator seen
            so far by that recurrence.
        on_step: called after every step with the number of products that step spent (the width
            of its block), e.g. to move a progress bar.

    Returns:
        g :class:`LanczosDecomposition` objects, in the order of the columns of ``starts``;
        ``num_products`` of each is its own number of steps, and they add up to the products spent.
    """
    if reorthogonalize and not keep_basis:
        raise ValueError("reorthogonalize=True needs keep_basis=True (it orthogonalises against the basis).")
    n = operator.size
    num_steps = int(num_steps)
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps must be between 1 and the operator size n={n}, got {num_steps}.")
    if not isinstance(starts, Tensor) or starts.dim() != 2 or starts.shape[0] != n or starts.shape[1] < 1:
        shape = tuple(starts.shape) if isinstance(starts, Tensor) else type(starts).__name__
        raise ValueError(f"starts must be a tensor of shape ({n}, g) with g >= 1 start vectors as columns, got {shape}.")
    dtype, device = operator.dtype, operator.device
    starts = starts.to(device=device, dtype=dtype)
    norms = torch.linalg.vector_norm(starts, dim=0)
    zero = (norms <= 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"starts must have nonzero columns; column(s) {zero} are zero.")
    tol = breakdown_tol if breakdown_tol is not None else n * torch.finfo(dtype).eps
    width, m = starts.shape[1], num_steps

    # Per-recurrence storage, indexed by "slot". The running recurrences always occupy slots
    # 0..active-1, so the running part of the bases is one contiguous-per-slot (active, k, n) view
    # for the batched Gram-Schmidt; a finished one is swapped behind them and never touched again.
    basis = torch.empty(width, m, n, dtype=dtype, device=device) if keep_basis else None
    alphas = torch.zeros(width, m, dtype=dtype, device=device)
    betas = torch.zeros(width, m - 1, dtype=dtype, device=device)
    slot_probe = list(range(width))
    q = (starts / norms).T.contiguous()  # (active, n): row j is the current vector of slot j
    q_prev = torch.zeros_like(q)
    beta_prev = torch.zeros(width, dtype=dtype, device=device)
    scale = torch.zeros(width, dtype=dtype, device=device)
    results: list[Optional[LanczosDecomposition]] = [None] * width
    active = width
    for step in range(m):
        if basis is not None:
            basis[:active, step] = q
        w = _apply_rows(operator, q)
        alpha = torch.linalg.vecdot(q, w)
        w = w - alpha.unsqueeze(1) * q - beta_prev.unsqueeze(1) * q_prev
        if reorthogonalize:
            kept = basis[:active, : step + 1]  # (active, k, n)
            for _ in range(2):
                w = w - torch.bmm(kept.transpose(1, 2), torch.bmm(kept, w.unsqueeze(2))).squeeze(2)
        alphas[:active, step] = alpha
        beta = torch.linalg.vector_norm(w, dim=1)
        scale = torch.maximum(scale, alpha.abs() + beta + beta_prev)
        if on_step is not None:
            on_step(active)
        if step == m - 1:
            for slot in range(active):
                results[slot_probe[slot]] = _decomposition(alphas, betas, basis, slot, step + 1, w[slot])
            break
        broke = (beta <= tol * scale).tolist()  # the step's one host sync
        betas[:active, step] = beta
        if any(broke):
            order = _compact(broke, [t for t in (basis, alphas, betas) if t is not None], step + 1, slot_probe)
            active = len(broke) - sum(broke)
            for new_slot in range(active, len(broke)):
                results[slot_probe[new_slot]] = _decomposition(alphas, betas, basis, new_slot, step + 1,
                                                               w[order[new_slot]])
            if active == 0:
                break
            keep = torch.tensor(order[:active], device=device)
            q, w, beta, scale = q[keep], w[keep], beta[keep], scale[keep]
        q_prev, q, beta_prev = q, w / beta.unsqueeze(1), beta
    return results  # type: ignore[return-value]


def _apply_rows(operator: Operator, rows: Tensor) -> Tensor:
    """``(A rows^T)^T`` for (b, n) rows: one block product, or a plain one for a single row."""
    if rows.shape[0] == 1:
        return operator.apply(rows[0]).unsqueeze(0)
    return operator.apply_block(rows.T.contiguous()).T


def _decomposition(alphas: Tensor, betas: Tensor, basis: Optional[Tensor], slot: int, steps: int,
                   residual: Tensor) -> LanczosDecomposition:
    return LanczosDecomposition(
        alphas=alphas[slot, :steps].clone(),
        betas=betas[slot, : steps - 1].clone(),
        basis=basis[slot, :steps].T if basis is not None else None,
        residual=residual.clone(),
        num_products=steps,
    )


def _compact(broke: list[bool], storages: list[Tensor], filled: int, slot_probe: list[int]) -> list[int]:
    """Move the running slots to the front of ``storages`` (in place, by swapping rows, so no copy of
    the whole bases is made) and the finished ones behind them; ``slot_probe`` is permuted alike.
    Returns ``order``: new slot i holds what old slot ``order[i]`` held."""
    order = list(range(len(broke)))
    remaining = len(broke) - sum(broke)
    holes = [slot for slot in range(remaining) if broke[slot]]
    movers = [slot for slot in range(remaining, len(broke)) if not broke[slot]]
    for hole, mover in zip(holes, movers):
        for storage in storages:
            part = storage[:, :filled]
            held = part[hole].clone()
            part[hole] = part[mover]
            part[mover] = held
        order[hole], order[mover] = order[mover], order[hole]
        slot_probe[hole], slot_probe[mover] = slot_probe[mover], slot_probe[hole]
    return order
