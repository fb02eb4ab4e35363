"""Thick-restart block Lanczos on the operator's batched product, on the operator's device.

Block Lanczos after Golub & Underwood (1977), "The block Lanczos method for computing eigenvalues",
restarted as in Zhou & Saad (2008), "Block Krylov-Schur method for large symmetric eigenvalue problems".
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
from torch import Tensor

from ..operators.base import Operator
from .contract import pick
from .krylov_schur import MAX_DEFAULT_BLOCK, default_block_size, native_solve
from .result import EigenResult

__all__ = ["block_lanczos", "default_block_size", "MAX_DEFAULT_BLOCK"]


def block_lanczos(
    operator: Union[Operator, Tensor, np.ndarray],
    num_eigenthings: int = 10,
    which: str = "LM",
    block_size: Optional[int] = None,
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
    """Extreme eigenpairs by thick-restart block Lanczos: b products at a time through ``apply_block``.

    The same Krylov-Schur engine as :func:`thick_restart_lanczos`, growing the basis by a block of
    b vectors per step with one batched product ``(n, b) -> (n, b)``. A block needs more products
    than single vectors for the same accuracy, but each batched product is cheaper per vector
    on operators that batch (the HVP operator on a GPU), and eigenvalues repeated up to b times
    are all found.

    Args:
        operator: an :class:`Operator` or a dense symmetric (n, n) matrix.
        num_eigenthings: k, the number of eigenpairs (1 <= k < n).
        which: "LM", "LA" or "SA".
        block_size: b, vectors per product (1 <= b, k + 2b <= n); default
            :func:`default_block_size` (``min(max(k, 2), 8)``, shrunk to fit a small operator).
        max_steps: the most times the basis is filled (restarts + 1).
        tol: stop when every wanted pair has ``||A v - lambda v|| <= tol * |lambda|``.
        num_lanczos_vectors: the most basis vectors (at least k + 2b, at most n); default
            ``max(2k + 20, 40, k + 10b)`` rounded up to whole blocks, lowered to fit ``max_basis_bytes``.
        init_vecs: warm start, (n,) or (m, n) rows; row i goes into column i mod b of the first
            block (several rows to one column are summed), random columns fill in.
        use_gpu: ignored; vectors live on the operator's device (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        to_numpy: numpy results (eigenvalues float64, eigenvectors in the operator's dtype), or
            tensors on the operator's device (eigenvalues float64).
        init_vec: the historical name of ``init_vecs``.
        seed: seed of the private generators; None: fresh randomness, the same on every rank.
        verbose: show a progress bar of products.
        max_basis_bytes: cap on the solve's own memory, as for :func:`thick_restart_lanczos`
            (the smallest basis is k + 2b vectors).
        check_multiplicity: when every pair converged, check for missed copies of repeated eigenvalues.

    Returns:
        An :class:`EigenResult` as for :func:`thick_restart_lanczos` (``num_products`` counts each
        vector of a block).
    """
    solver = "block_lanczos"
    init, init_name = pick(solver, "init_vecs", init_vecs, "init_vec", init_vec)
    return native_solve(
        operator, num_eigenthings, solver=solver, which=which, block_size=block_size, max_steps=max_steps,
        tol=tol, num_lanczos_vectors=num_lanczos_vectors, init_vecs=init, init_name=init_name, fp16=fp16,
        to_numpy=to_numpy, seed=seed, verbose=verbose, max_basis_bytes=max_basis_bytes,
        check_multiplicity=check_multiplicity,
    )
