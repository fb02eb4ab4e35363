"""The diagonal of a symmetric operator: stochastic (with a standard error per entry) or exact.

Stochastic (Bekas, Kokiopoulou, Saad 2007): ``diag(A) = E[z * (A z)]`` for probes with
``E[z z^T] = I``. With Rademacher probes the variance of entry i of one sample is
``sum_{j != i} A_ij^2`` (a diagonal matrix is recovered exactly by one probe); with Gaussian
probes it is ``sum_j A_ij^2 + A_ii^2``.

Exact: ``A_ii = e_i^T A e_i`` from n products with the unit vectors, in blocks; it needs no
dense matrix, so it works for any operator whose n products are affordable (small models).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..utils import check_positive_int, logger, progress
from .estimates import DiagonalEstimate
from .montecarlo import elementwise_products, monte_carlo, warn_diagonal_budget
from .probes import check_deterministic, check_probe_arguments, unit_blocks
from .exchangeable import xdiag

__all__ = ["DiagonalEstimate", "hutchinson_diagonal", "exact_diagonal", "estimate_diagonal", "DIAGONAL_METHODS"]


@runs_frozen
def hutchinson_diagonal(
    operator: Union[Operator, Tensor, np.ndarray],
    max_products: int = 100,
    tol: Optional[float] = None,
    rtol: Optional[float] = None,
    *,
    distribution: str = "rademacher",
    min_probes: int = 10,
    block_size: int = 16,
    seed: Optional[int] = 0,
    verbose: bool = True,
) -> DiagonalEstimate:
    """Stochastic estimate of the diagonal of a symmetric operator, with per-entry standard errors.

    Args:
        operator: an :class:`Operator` or a dense symmetric matrix. A stochastic one
            (``full_dataset=False``) is allowed: the estimate is of the expected mini-batch matrix,
            and the standard errors come from the spread between block products (mini-batches).
        max_products: the budget: at most this many probes (one product each). Without ``tol``
            and ``rtol`` exactly this many are used.
        tol: stop once every entry's standard error is at most ``tol`` (absolute).
        rtol: stop once ``||std_error||_2 <= rtol * ||diagonal||_2``. With both, either stops.
        distribution: "rademacher" (default; exact on a diagonal matrix), "gaussian" or "sphere".
        min_probes: probes before the standard errors are trusted for stopping.
        block_size: probes per block product.
        seed: seed of the private probe generator (None: fresh randomness).
        verbose: show a progress bar.

    Returns:
        A :class:`DiagonalEstimate`. Warns (``ConvergenceWarning``) when a tolerance was asked for
        and the budget ran out first.
    """
    op = as_operator(operator)
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    first = op.num_products
    with progress(total=settings.max_products, desc="diagonal (Hutchinson)", verbose=verbose) as bar:
        run = monte_carlo(op, lambda b: settings.draw(op, b), elementwise_products, settings.max_products, settings,
                          bar)
    mean, se = run.mean, run.std_error
    result = DiagonalEstimate(
        mean.to(op.dtype), se.to(op.dtype), op.num_products - first, run.num_samples, "hutchinson", run.converged,
        info={"distribution": settings.distribution, "clustered": run.clustered},
    )
    if not result.converged:
        warn_diagonal_budget("hutchinson_diagonal", result.num_products, mean, se, tol, rtol, "1/sqrt(products)")
    logger.info("hutchinson_diagonal: %d probes, max standard error %.3g.", run.num_samples, float(se.max()))
    return result


@runs_frozen
def exact_diagonal(
    operator: Union[Operator, Tensor, np.ndarray],
    *,
    block_size: int = 64,
    verbose: bool = True,
) -> DiagonalEstimate:
    """The exact diagonal of a symmetric operator from n products with the unit vectors.

    Memory is ``n * block_size`` numbers (never the (n, n) matrix); the cost is n products, so this
    is for small models or parameter blocks (``params=``).

    Args:
        operator: an :class:`Operator` or a dense symmetric matrix.
        block_size: unit vectors per block product.
        verbose: show a progress bar.

    Returns:
        A :class:`DiagonalEstimate` with ``method="exact"`` and zero standard errors.
    """
    op = as_operator(operator)
    block_size = check_positive_int(block_size, "block_size")
    check_deterministic(op, "exact_diagonal")
    n = op.size
    first = op.num_products
    diag = torch.empty(n, dtype=op.dtype, device=op.device)
    with progress(total=n, desc="exact diagonal", verbose=verbose) as bar:
        for start, stop, units in unit_blocks(op, block_size):
            diag[start:stop] = op.apply_block(units)[start:stop].diagonal()
            bar.update(stop - start)
    return DiagonalEstimate(diag, torch.zeros_like(diag), op.num_products - first, n, "exact")


DIAGONAL_METHODS: dict[str, Callable[..., DiagonalEstimate]] = {
    "hutchinson": hutchinson_diagonal,
    "xdiag": xdiag,
    "exact": exact_diagonal,
}


def estimate_diagonal(
    operator: Union[Operator, Tensor, np.ndarray], method: str = "hutchinson", **kwargs: Any
) -> DiagonalEstimate:
    """Diagonal by ``method`` ("hutchinson", "xdiag" or "exact"); ``kwargs`` go to that estimator."""
    if method not in DIAGONAL_METHODS:
        raise ValueError(
            f"method={method!r} is not known; choose one of {', '.join(map(repr, DIAGONAL_METHODS))}."
        )
    return DIAGONAL_METHODS[method](operator, **kwargs)
