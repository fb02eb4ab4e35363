"""Stochastic trace estimation: Hutchinson and Hutch++, with a standard error and adaptive stopping.

Hutchinson: ``tr(A) = E[z^T A z]`` for probes with ``E[z z^T] = I``; the estimate is the mean of
``z_i^T A z_i`` and its standard error the sample standard deviation over ``sqrt(k)``. With
Rademacher probes the variance of one sample is ``2 (||A||_F^2 - sum_i A_ii^2)``, with Gaussian
probes ``2 ||A||_F^2``.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021, "Hutch++: Optimal stochastic trace estimation"):
take the range ``Q`` of ``A S`` for a random sketch ``S`` of ``s`` columns, compute
``tr(Q^T A Q)`` exactly, and estimate the trace of the rest, ``(I - QQ^T) A (I - QQ^T)``, by
Hutchinson. The large eigenvalues (the outliers of a Hessian spectrum) land in ``Q`` and stop
dominating the variance, so on spectra with a few large eigenvalues the error falls like ``1/m`` in
the number of products ``m`` instead of ``1/sqrt(m)``. Given ``Q`` the residual estimate is
unbiased, so its sample standard error is the standard error of the whole estimate. XTrace
(``exchangeable.py``) uses every product for both parts and is usually more accurate still.

Both work for indefinite operators: the stopping rule compares the standard error with
``max(tol, rtol * |estimate|)``, never with the signed estimate.

On a stochastic operator (a model operator with ``full_dataset=False``: one mini-batch per block
product) Hutchinson estimates the trace of the expected mini-batch Hessian; the probes of one
block share its mini-batch, so the standard error is computed over blocks (cluster-robust) and
includes the mini-batch noise. Hutch++ refuses such an operator (its exact part is one product).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..utils import check_positive_int, logger, progress
from .estimates import TraceEstimate
from .montecarlo import Integrand, MonteCarloResult, monte_carlo, quadratic_forms, warn_budget
from .probes import ProbeSettings, check_deflatable, check_probe_arguments
from .exchangeable import xtrace

__all__ = ["TraceEstimate", "hutchinson_trace", "hutchpp_trace", "estimate_trace", "TRACE_METHODS"]


@runs_frozen
def hutchinson_trace(
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
) -> TraceEstimate:
    """Trace of a symmetric operator by Hutchinson's estimator, with its standard error.

    Args:
        operator: an :class:`Operator` (e.g. ``HVPOperator``) or a dense symmetric matrix. A
            stochastic one (``full_dataset=False``) is allowed: the standard error then comes from
            the spread between block products (mini-batches), so it needs at least two blocks.
        max_products: the budget: at most this many probes (one product each). Without ``tol``
            and ``rtol`` exactly this many are used.
        tol: stop once the standard error is at most ``tol`` (absolute, in units of the trace).
        rtol: stop once the standard error is at most ``rtol * |estimate|``. With both, the
            looser of the two stops. A negative trace is handled like a positive one.
        distribution: "rademacher" (default, lower variance), "gaussian" or "sphere" (uniform on
            the sphere of radius sqrt(n)).
        min_probes: probes before the standard error is trusted for stopping.
        block_size: probes per block product (the model operators reuse one forward pass).
        seed: seed of the private probe generator (None: fresh randomness; the global RNG is
            never touched).
        verbose: show a progress bar.

    Returns:
        A :class:`TraceEstimate`. Warns (``ConvergenceWarning``) when a tolerance was asked for and
        the budget ran out first.
    """
    op = as_operator(operator)
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    first = op.num_products
    with progress(total=settings.max_products, desc="trace (Hutchinson)", verbose=verbose) as bar:
        run = monte_carlo(op, lambda b: settings.draw(op, b), quadratic_forms, settings.max_products, settings,
                          bar, keep_samples=True)
    result = TraceEstimate(
        float(run.mean[0]), float(run.std_error[0]), op.num_products - first, run.num_samples, "hutchinson",
        run.converged, run.samples, info={"distribution": settings.distribution, "clustered": run.clustered},
    )
    if not result.converged:
        warn_budget("hutchinson_trace", result, tol, rtol, "1/sqrt(products)")
    logger.info("hutchinson_trace: %.6g +- %.2g with %d products.", result.estimate, result.std_error,
                result.num_products)
    return result


def sketch_size_for(sketch_size: Optional[int], settings: ProbeSettings, n: int) -> int:
    """The sketch size s of a Hutch++-style estimator, capped at n, checked against the budget.

    Default: ``max_products // 3`` (the split of the Hutch++ paper) for a fixed budget; with ``tol`` /
    ``rtol``, ``min(max_products // 3, 32)``, enough to take out the handful of outlier eigenvalues of
    a typical loss Hessian (about one per class) and leave the rest of the budget to the probes.
    """
    max_products = settings.max_products
    if sketch_size is None:
        s = min(max_products // 3, 32) if settings.adaptive else max_products // 3
    else:
        s = check_positive_int(sketch_size, "sketch_size")
    s = max(1, min(s, n))
    if s < n and max_products < 2 * s + 2:
        raise ValueError(
            f"max_products={max_products} leaves no room for the residual probes after the sketch "
            f"(2 * sketch_size = {2 * s} products); raise max_products to at least {2 * s + 2} or "
            f"lower sketch_size."
        )
    return s


def deflated_estimate(
    op: Operator,
    settings: ProbeSettings,
    s: int,
    exact_part_of: Callable[[Tensor, Tensor], float],
    integrand: Integrand,
    bar: Any,
) -> tuple[float, Optional[MonteCarloResult]]:
    """The two phases of a Hutch++-style estimator.

    Draws a sketch ``S`` of s probes, takes an orthonormal basis ``Q`` of ``range(A S)`` (s products)
    and its products ``A Q`` (s more), and returns ``exact_part_of(Q, A Q)`` together with the
    Monte-Carlo average of ``integrand`` over the rest of the budget, with probes deflated by ``Q``
    (``z - Q Q^T z``). When s = n, ``Q`` spans everything and there is no residual phase (None).
    """
    sketch = settings.draw(op, s)
    basis, _ = torch.linalg.qr(op.apply_block(sketch))
    bar.update(s)
    exact_part = exact_part_of(basis, op.apply_block(basis))
    bar.update(s)
    if s == op.size:
        return exact_part, None

    def deflated_probes(count: int) -> Tensor:
        probes = settings.draw(op, count)
        return probes - basis @ (basis.T @ probes)

    run = monte_carlo(op, deflated_probes, integrand, settings.max_products - 2 * s, settings, bar,
                      offset=exact_part, keep_samples=True)
    return exact_part, run


@runs_frozen
def hutchpp_trace(
    operator: Union[Operator, Tensor, np.ndarray],
    max_products: int = 102,
    tol: Optional[float] = None,
    rtol: Optional[float] = None,
    *,
    sketch_size: Optional[int] = None,
    distribution: str = "rademacher",
    min_probes: int = 10,
    block_size: int = 16,
    seed: Optional[int] = 0,
    verbose: bool = True,
) -> TraceEstimate:
    """Trace of a symmetric operator by Hutch++, with its standard error.

    Spends ``2 * sketch_size`` products on a low-rank part whose trace is exact and the rest on
    Hutchinson probes of the deflated operator ``(I - QQ^T) A (I - QQ^T)``.

    Args:
        operator: an :class:`Operator` or a dense symmetric matrix; deterministic (ValueError for a
            mini-batch operator, ``full_dataset=False``: use :func:`hutchinson_trace` there).
        max_products: the budget of products (at least ``2 * sketch_size + 2``). Without ``tol``
            and ``rtol`` all of it is used.
        tol, rtol: stop the residual phase once the standard error is at most
            ``max(tol, rtol * |estimate|)`` (see :func:`hutchinson_trace`).
        sketch_size: s, the rank of the deflated part, capped at n (with ``s = n`` the trace is
            exact). Default: ``max_products // 3`` (the split of the Hutch++ paper) for a fixed
            budget; with ``tol`` / ``rtol``, ``min(max_products // 3, 32)``, enough to take out the
            handful of outlier eigenvalues of a typical loss Hessian (about one per class) and
            leave the rest of the budget to the probes that reach the tolerance.
        distribution, min_probes, block_size, seed, verbose: as in :func:`hutchinson_trace`.

    Returns:
        A :class:`TraceEstimate`; ``info["exact_part"]`` is ``tr(Q^T A Q)`` and
        ``info["sketch_size"]`` is s.
    """
    op = as_operator(operator)
    check_deflatable(op, "hutchpp_trace", "hutchinson_trace")
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    s = sketch_size_for(sketch_size, settings, op.size)
    first = op.num_products
    total = 2 * s if s == op.size else settings.max_products
    with progress(total=total, desc="trace (Hutch++)", verbose=verbose) as bar:
        exact_part, run = deflated_estimate(
            op, settings, s, lambda q, aq: float(torch.einsum("ij,ij->", q, aq).double()), quadratic_forms, bar
        )
    if run is None:  # Q spans the whole space: the trace is exact
        mean, se, samples, met = 0.0, 0.0, np.zeros(0), True
    else:
        mean, se, samples, met = float(run.mean[0]), float(run.std_error[0]), run.samples, run.converged
    result = TraceEstimate(
        exact_part + mean, se, op.num_products - first, samples.size, "hutch++", met, samples,
        info={"exact_part": exact_part, "sketch_size": s, "distribution": settings.distribution},
    )
    if not met:
        warn_budget("hutchpp_trace", result, tol, rtol, "1/sqrt(products), faster on spectra with a few large "
                    "eigenvalues")
    logger.info("hutchpp_trace: %.6g +- %.2g with %d products (sketch %d).", result.estimate, se,
                result.num_products, s)
    return result


TRACE_METHODS: dict[str, Callable[..., TraceEstimate]] = {
    "hutchinson": hutchinson_trace,
    "hutch++": hutchpp_trace,
    "xtrace": xtrace,
}


def estimate_trace(
    operator: Union[Operator, Tensor, np.ndarray], method: str = "hutch++", **kwargs: Any
) -> TraceEstimate:
    """Trace by ``method`` ("hutch++", "hutchinson" or "xtrace"); ``kwargs`` go to that estimator."""
    if method not in TRACE_METHODS:
        raise ValueError(f"method={method!r} is not known; choose one of {', '.join(map(repr, TRACE_METHODS))}.")
    return TRACE_METHODS[method](operator, **kwargs)
