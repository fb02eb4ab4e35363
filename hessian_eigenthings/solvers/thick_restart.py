"""Thick-restart Lanczos with full reorthogonalisation, on the operator's device.

Wu & Simon (2000), "Thick-restart Lanczos method for large symmetric eigenvalue problems"; in the
Krylov-Schur form of Stewart (2001), "A Krylov-Schur algorithm for large eigenproblems".
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
from torch import Tensor

from ..operators.base import Operator
from .contract import pick
from .krylov_schur import native_solve
from .result import EigenResult


def thick_restart_lanczos(
    operator: Union[Operator, Tensor, np.ndarray],
    num_eigenthings: int = 10,
    which: str = "LM",
    max_steps: int = 100,
    tol: float = 1e-6,
    num_lanczos_vectors: Optional[int] = None,
    init_vecs: Any = None,
    use_gpu: bool = True,
    fp16: bool = False,
    to_numpy: bool = True,
    *,
    init_vec: Any = None,
    seed: Optional[int] = 0,
    verbose: bool = True,
    max_basis_bytes: Optional[int] = None,
    check_multiplicity: bool = True,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by thick-restart Lanczos (Krylov-Schur), natively.

    One product per step; every vector stays on the operator's device and dtype, fully
    reorthogonalised against the basis; the host reads only small matrices, at restarts and at a
    few checkpoints in between (never once per product). When the basis is full it is compressed
    to the best Ritz vectors (the wanted k and 30% of the rest) and grown again. Ritz residuals
    ``||A x - theta x||`` come from the Krylov-Schur relation (equal to measured residuals up to
    rounding, about ``eps * ||A||``) and cost no product.

    Like every single-vector Krylov method (ARPACK too), it sees one copy of a repeated eigenvalue
    per breakdown of the Krylov space; for eigenvalues repeated m times use :func:`block_lanczos`
    with ``block_size >= m``.

    Args:
        operator: an :class:`Operator` or a dense symmetric (n, n) matrix.
        num_eigenthings: k, the number of eigenpairs (1 <= k < n).
        which: "LM" (largest magnitude), "LA" (largest algebraic) or "SA" (smallest algebraic).
        max_steps: the most times the basis is filled (restarts + 1).
        tol: stop when every wanted pair has ``||A v - lambda v|| <= tol * |lambda|`` (residuals
            below ``10 * eps * max|lambda|`` of the operator's dtype count as converged).
        num_lanczos_vectors: the most basis vectors kept on the device (memory n * this);
            between k + 2 (or n, if smaller) and n; default ``max(2k + 20, 40)`` (ARPACK's),
            lowered to fit ``max_basis_bytes``.
        init_vecs: warm start, a (n,) vector or (m, n) rows such as the last call's eigenvectors;
            the Lanczos start vector is their normalised sum (its Krylov space holds them all).
            One vector near the answer cuts the products most; for several vectors of a tight
            cluster, :func:`block_lanczos` with ``block_size`` = their number uses them better.
        use_gpu: ignored; vectors live on the operator's device (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        to_numpy: return numpy arrays (eigenvalues float64, eigenvectors in the operator's dtype);
            False returns tensors on the operator's device (eigenvalues float64).
        init_vec: the historical name of ``init_vecs``.
        seed: seed of the private generators (start vector, breakdown noise); None: fresh, the same
            on every rank under torch.distributed.
        verbose: show a progress bar of products.
        max_basis_bytes: cap on the solve's own memory (basis, result and working vectors; see
            :func:`~hessian_eigenthings.solver_memory`): the basis is made smaller to fit (more
            restarts); ValueError, naming the memory needed, when even k + 2 vectors do not fit.
        check_multiplicity: when every pair converged, check for missed copies of repeated eigenvalues.

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvalues (k,), eigenvectors (k, n))``, most
        extreme first in the sense of ``which``, with ``residuals``, ``converged``,
        ``num_products`` and ``info`` (restarts, checkpoints, basis size). Warns
        (ConvergenceWarning) for pairs that did not meet ``tol`` within ``max_steps``.
    """
    solver = "thick_restart_lanczos"
    init, init_name = pick(solver, "init_vecs", init_vecs, "init_vec", init_vec)
    return native_solve(
        operator, num_eigenthings, solver=solver, which=which, block_size=1, max_steps=max_steps, tol=tol,
        num_lanczos_vectors=num_lanczos_vectors, init_vecs=init, init_name=init_name, fp16=fp16,
        to_numpy=to_numpy, seed=seed, verbose=verbose, max_basis_bytes=max_basis_bytes,
        check_multiplicity=check_multiplicity,
    )
