"""Lanczos through scipy's ARPACK (``scipy.sparse.linalg.eigsh``), on any operator, in float64.

Implicitly restarted Lanczos: Lehoucq, Sorensen & Yang (1998), "ARPACK Users' Guide".
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, eigsh
from torch import Tensor

from ..operators.base import Operator, runs_frozen
from ..utils import check_positive_int
from .contract import check_in, finish, pick, zero_pairs
from .krylov_schur import start_block
from .memory import arpack_memory, fit_basis
from .result import EigenResult, order_by_which, random_vectors


class NoConvergenceError(RuntimeError):
    """ARPACK stopped before ``num_eigenthings`` eigenpairs converged.

    ``eigenvalues`` / ``eigenvectors`` ((m,), (m, n)) hold the m < k pairs that did converge.
    """

    def __init__(self, message: str, eigenvalues: np.ndarray, eigenvectors: np.ndarray) -> None:
        super().__init__(message)
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors


def default_num_lanczos_vectors(num_eigenthings: int, size: int) -> int:
    """ARPACK's ``ncv``: a generous Krylov basis (2k + 20, at least 40) converges on clustered Hessian
    spectra within few restarts; the cost is memory of ncv * n float64 numbers on the host."""
    return min(size, max(2 * num_eigenthings + 20, 40))


@runs_frozen
def lanczos(
    operator: Union[Operator, Tensor, np.ndarray],
    num_eigenthings: int = 10,
    which: str = "LM",
    max_steps: int = 20,
    tol: float = 1e-6,
    num_lanczos_vectors: Optional[int] = None,
    init_vec: Optional[Union[Tensor, np.ndarray]] = None,
    use_gpu: bool = False,
    fp16: bool = False,
    *,
    init_vecs: Optional[Union[Tensor, np.ndarray]] = None,
    seed: Optional[int] = 0,
    verbose: bool = True,
    to_numpy: bool = True,
    max_basis_bytes: Optional[int] = None,
    check_multiplicity: bool = True,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by implicitly restarted Lanczos (ARPACK).

    ARPACK works in float64 on the host; each product moves one vector to the operator's
    device and back. After the solve, the residuals are measured with one block product.

    Args:
        operator: an :class:`Operator` or a dense symmetric (n, n) matrix.
        num_eigenthings: k, the number of eigenpairs (1 <= k < n).
        which: "LM" (largest magnitude), "LA" (largest algebraic) or "SA" (smallest algebraic).
        max_steps: ARPACK's ``maxiter``, the most implicit restarts.
        tol: relative accuracy of the eigenvalues, ARPACK's stopping test
            ``||A v - lambda v|| <= tol * |lambda|``.
        num_lanczos_vectors: ARPACK's ``ncv``, the Krylov basis size (k < ncv <= n); default
            :func:`default_num_lanczos_vectors`.
        init_vec: the historical name of ``init_vecs``.
        use_gpu: ignored; the operator decides where products run (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        init_vecs: warm start, a (n,) vector or (m, n) rows; ARPACK takes one start vector, their
            normalised sum (whose Krylov space holds each of them once they are eigenvectors).
            Random (from ``seed``) when None.
        seed: seed of the private generator for the random start vector (None: fresh).
        verbose: show a progress bar of products.
        to_numpy: numpy results (eigenvalues float64, eigenvectors in the operator's dtype), or
            tensors on the operator's device.
        max_basis_bytes: cap on the solve's memory (ARPACK's float64 basis and work space included):
            ``ncv`` is lowered to fit; ValueError when even ncv = k + 1 does not.
        check_multiplicity: when every pair converged, check for missed copies of repeated eigenvalues.

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvalues (k,), eigenvectors (k, n))``,
        sorted most extreme first in the sense of ``which``.

    Raises:
        NoConvergenceError: ARPACK ran out of restarts; the message says what to raise.
    """
    solver = "lanczos"
    init, init_name = pick(solver, "init_vecs", init_vecs, "init_vec", init_vec)
    setup = check_in(
        solver, operator, num_eigenthings, which=which, tol=tol, max_steps=max_steps, init_vecs=init, seed=seed,
        verbose=verbose, to_numpy=to_numpy, fp16=fp16, max_basis_bytes=max_basis_bytes,
        check_multiplicity=check_multiplicity, krylov=True, init_name=init_name,
    )
    op, k, n = setup.op, setup.k, setup.op.size
    max_steps = setup.max_steps or 20
    try:
        ncv = _basis_size(setup, num_lanczos_vectors)
        if setup.starts is None:
            start = random_vectors(op, 1, setup.seed)
        elif setup.starts.shape[1] == 1:
            start = setup.starts
        else:  # one start vector for several: their normalised sum
            start = start_block(setup.starts, torch.zeros(n, 1, dtype=op.dtype, device=op.device))
        v0 = start[:, 0].detach().to("cpu", torch.float64).numpy()
        try:
            values, vectors = eigsh(op.to_scipy(), k=k, which=setup.which, maxiter=max_steps, tol=setup.tol,
                                    ncv=ncv, v0=v0)
        except ArpackNoConvergence as exc:
            raise NoConvergenceError(
                f"ARPACK found only {len(exc.eigenvalues)} of {k} eigenpairs to tol={setup.tol:g} within "
                f"max_steps={max_steps} restarts using {op.num_products} products. Raise max_steps, raise "
                f"num_lanczos_vectors (now {ncv}), or loosen tol; or use thick_restart_lanczos. The converged "
                f"pairs are on this exception's .eigenvalues/.eigenvectors.",
                np.asarray(exc.eigenvalues) / op.scale,
                np.asarray(exc.eigenvectors).T,
            ) from None
        except ArpackError:
            if op.nonzero_seen:
                raise
            # Every product was exactly zero (e.g. parameters the loss does not use): ARPACK stops on
            # a zero Krylov vector, but the answer is known. The residuals are measured all the same:
            # a warm start inside the null space of a nonzero operator must not pass for converged.
            values_t, rows, _ = zero_pairs(setup)
            residuals = torch.stack([torch.linalg.vector_norm(op.apply(row)) for row in rows])
            advice = ("Every product of the Lanczos process was zero, but the operator is not: the start vector "
                      "lies in its null space. Start from another vector (init_vecs=None for a random one).")
        else:
            values_t, rows, residuals = _measured_pairs(op, values, vectors, setup.which)
            del vectors
            advice = ("ARPACK reported convergence, but the residuals measured afterwards are larger (is the "
                      "operator symmetric and deterministic?).")
    except BaseException:
        op.close()  # on success, finish() closes it after its own products (the multiplicity check)
        raise
    return finish(setup, values_t, rows, residuals, info={"ncv": ncv}, advice=advice)


def _basis_size(setup: Any, num_lanczos_vectors: Optional[int]) -> int:
    k, n, op = setup.k, setup.op.size, setup.op
    if num_lanczos_vectors is None:
        wanted = default_num_lanczos_vectors(k, n)
    else:
        wanted = check_positive_int(num_lanczos_vectors, "num_lanczos_vectors")
        if not k < wanted <= n:
            raise ValueError(
                f"num_lanczos_vectors={wanted} must satisfy num_eigenthings < num_lanczos_vectors <= n "
                f"({k} < ncv <= {n}); about 2 * num_eigenthings + 20 works well."
            )
    return fit_basis(
        setup.solver, wanted, min(n, k + 1), num_lanczos_vectors is not None, setup.max_basis_bytes,
        lambda m: arpack_memory(n, k, m, op.dtype.itemsize),
    )


def _measured_pairs(op: Operator, values: np.ndarray, vectors: np.ndarray, which: str) -> tuple[Tensor, Tensor, Tensor]:
    """ARPACK's pairs as (values (k,) float64, rows (k, n) in the operator's dtype and device, measured
    residuals (k,)), ordered by ``which``; k products, one vector at a time, so that no second copy
    of the vectors is held."""
    values_t = torch.from_numpy(np.asarray(values, dtype=np.float64))
    order = order_by_which(values_t, which).tolist()
    values_t = values_t[order]
    rows = torch.empty(len(order), op.size, dtype=op.dtype, device=op.device)
    for row, column in enumerate(order):
        rows[row] = torch.from_numpy(np.ascontiguousarray(vectors[:, column]))
    theta = values_t.to(device=op.device, dtype=op.dtype)
    residuals = torch.stack([torch.linalg.vector_norm(op.apply(rows[j]) - theta[j] * rows[j])
                             for j in range(len(order))])
    return values_t, rows, residuals
