"""Lanczos through scipy's ARPACK (``scipy.sparse.linalg.eigsh``), on any operator, in float64."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..utils import check_num_eigenthings, check_positive_int, check_which, logger, progress
from .result import (
    EigenResult,
    check_init_vectors,
    compat_flags,
    converged_mask,
    order_by_which,
    random_vectors,
    residual_norms,
    warn_unconverged,
)


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
    spectra within few restarts; the cost is memory of ncv * n floats on the host."""
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
    seed: Optional[int] = 0,
    verbose: bool = True,
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
        init_vec: start vector of shape (n,); random (from ``seed``) when None.
        use_gpu: ignored; the operator decides where products run (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        seed: seed of the private generator for the random start vector.
        verbose: show a progress bar of products.

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvalues (k,), eigenvectors (k, n))`` numpy
        arrays, sorted most extreme first in the sense of ``which``.

    Raises:
        NoConvergenceError: ARPACK ran out of restarts; the message says what to raise.
    """
    compat_flags("lanczos", fp16)
    op = as_operator(operator)
    k = check_num_eigenthings(num_eigenthings, op.size)
    which = check_which(which)
    max_steps = check_positive_int(max_steps, "max_steps")
    tol = float(tol)
    if not 0 < tol < float("inf"):
        raise ValueError(f"tol must be a positive number such as 1e-6, got {tol}.")
    if num_lanczos_vectors is None:
        ncv = default_num_lanczos_vectors(k, op.size)
    else:
        ncv = check_positive_int(num_lanczos_vectors, "num_lanczos_vectors")
        if not k < ncv <= op.size:
            raise ValueError(
                f"num_lanczos_vectors={ncv} must satisfy num_eigenthings < num_lanczos_vectors <= n "
                f"({k} < ncv <= {op.size}); about 2 * num_eigenthings + 20 works well."
            )
    start = check_init_vectors(init_vec, op, 1, "init_vec")
    if start is None:
        start = random_vectors(op, 1, seed)
    v0 = start[:, 0].detach().to("cpu", torch.float64).numpy()

    first_products = op.num_products
    base = op.to_scipy()
    bar = progress(desc="lanczos (ARPACK)", verbose=verbose, total=None)

    def counted(x: np.ndarray) -> np.ndarray:
        bar.update(1)
        return base.matvec(x)

    scipy_op = LinearOperator(op.shape, matvec=counted, rmatvec=counted, dtype=np.float64)
    try:
        values, vectors = eigsh(scipy_op, k=k, which=which, maxiter=max_steps, tol=tol, ncv=ncv, v0=v0)
    except ArpackNoConvergence as exc:
        got = len(exc.eigenvalues)
        raise NoConvergenceError(
            f"ARPACK found only {got} of {k} eigenpairs to tol={tol:g} within max_steps={max_steps} "
            f"restarts using {op.num_products - first_products} products. Raise max_steps, raise "
            f"num_lanczos_vectors (now {ncv}), or loosen tol. The converged pairs are on this "
            f"exception's .eigenvalues/.eigenvectors.",
            np.asarray(exc.eigenvalues),
            np.asarray(exc.eigenvectors).T,
        ) from None
    finally:
        bar.close()

    vals_t = torch.as_tensor(values, dtype=op.dtype, device=op.device)
    order = order_by_which(vals_t, which)
    vals_t = vals_t[order]
    vecs_t = torch.as_tensor(vectors, dtype=op.dtype, device=op.device)[:, order]
    residuals, _ = residual_norms(op, vals_t, vecs_t)
    # ARPACK's own test ran in float64 on the host; a float32 operator only resolves ~eps * ||A||.
    converged = converged_mask(residuals, vals_t, tol, op.dtype)
    residual_arr = residuals.double().cpu().numpy()
    warn_unconverged(
        "lanczos", vals_t.tolist(), residual_arr.tolist(), converged.cpu().tolist(), tol,
        "ARPACK reported convergence, but the residuals measured afterwards are larger (is the operator "
        "symmetric and deterministic?).",
    )
    num_products = op.num_products - first_products
    logger.info("lanczos: %d eigenpairs with %d products (ncv=%d).", k, num_products, ncv)
    eigenvalues = values[order.cpu().numpy()]
    eigenvectors = np.ascontiguousarray(vectors[:, order.cpu().numpy()].T)
    return EigenResult(
        eigenvalues, eigenvectors, residual_arr, converged.cpu().numpy(), num_products, which, tol,
        info={"ncv": ncv},
    )
