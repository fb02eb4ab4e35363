"""Thick-restart block Lanczos on the operator's batched product, on the operator's device."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
from torch import Tensor

from ..operators.base import Operator
from ..utils import check_positive_int
from .krylov_schur import native_solve
from .result import EigenResult

MAX_DEFAULT_BLOCK = 8


def default_block_size(num_eigenthings: int) -> int:
    """``min(max(k, 2), 8)``: a block as wide as the wanted pairs (so a cluster or a repeated
    eigenvalue among them is found), within the width where batched products still pay off."""
    return min(max(num_eigenthings, 2), MAX_DEFAULT_BLOCK)


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
    seed: Optional[int] = 0,
    verbose: bool = True,
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
        block_size: b, vectors per product (1 <= b < n); default :func:`default_block_size`.
        max_steps: the most times the basis is filled (restarts + 1).
        tol: stop when every wanted pair has ``||A v - lambda v|| <= tol * |lambda|``.
        num_lanczos_vectors: the most basis vectors (at least k + 2b, at most n); default
            ``max(2k + 20, 40, k + 10b)`` rounded up to whole blocks.
        init_vecs: warm start, (n,) or (m, n) rows; row i goes into column i mod b of the first
            block (several rows to one column are summed), random columns fill in.
        use_gpu: ignored; vectors live on the operator's device (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        to_numpy: numpy results (eigenvalues float64), or tensors on the operator's device.
        seed: seed of the private generators; None: fresh randomness.
        verbose: show a progress bar of products.

    Returns:
        An :class:`EigenResult` as for :func:`thick_restart_lanczos` (``num_products`` counts each
        vector of a block).
    """
    if block_size is None:
        block_size = default_block_size(check_positive_int(num_eigenthings, "num_eigenthings"))
    return native_solve(
        operator, num_eigenthings, which, block_size, max_steps, tol, num_lanczos_vectors, init_vecs, fp16,
        to_numpy, seed, verbose, solver="block_lanczos",
    )
