"""Stochastic trace estimation: Hutchinson and Hutch++, with a standard error and adaptive stopping.

Hutchinson: ``tr(A) = E[z^T A z]`` for probes with ``E[z z^T] = I``; the estimate is the mean of
``z_i^T A z_i`` and its standard error the sample standard deviation over ``sqrt(k)``. With
Rademacher probes the variance of one sample is ``2 (||A||_F^2 - sum_i A_ii^2)``, with Gaussian
probes ``2 ||A||_F^2``.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021): take the range ``Q`` of ``A S`` for a random
sketch ``S`` of ``s`` columns, compute ``tr(Q^T A Q)`` exactly, and estimate the trace of the rest,
``(I - QQ^T) A (I - QQ^T)``, by Hutchinson. The large eigenvalues (the outliers of a Hessian
spectrum) land in ``Q`` and stop dominating the variance, so on spectra with a few large
eigenvalues the error falls like ``1/m`` in the number of products ``m`` instead of
``1/sqrt(m)``. Given ``Q`` the residual estimate is unbiased, so its sample standard error is the
standard error of the whole estimate.

Both work for indefinite operators: the stopping rule compares the standard error with
``max(tol, rtol * |estimate|)``, never with the signed estimate.

On a stochastic operator (a model operator with ``full_dataset=False``: one mini-batch per block
product) Hutchinson estimates the trace of the expected mini-batch Hessian; the probes of one
block share its mini-batch, so the standard error is computed over blocks (cluster-robust) and
includes the mini-batch noise. Hutch++ refuses such an operator (its exact part is one product).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..solvers.result import ConvergenceWarning
from ..utils import check_positive_int, logger, progress, user_stacklevel
from .probes import ProbeSettings, check_probe_arguments


@dataclass
class TraceEstimate:
    """A trace estimate and how it was obtained.

    Attributes:
        estimate: the trace estimate (float).
        std_error: its standard error (the standard deviation of the estimator, estimated from
            the probes; ``inf`` with fewer than two probes). About 95% of estimates lie within
            ``1.96 * std_error`` of the true trace.
        num_products: operator-vector products used.
        num_probes: Hutchinson probes (for Hutch++: the probes of the residual phase).
        method: "hutchinson" or "hutch++".
        converged: False when a requested ``tol`` / ``rtol`` was not reached within the budget.
        samples: (num_probes,) float64 array of the per-probe values ``z^T A z`` (for Hutch++, of
            the residual operator) whose mean plus ``info["exact_part"]`` is the estimate.
        info: extras, e.g. ``exact_part`` (``tr(Q^T A Q)`` of Hutch++) and ``sketch_size``; for
            Hutchinson ``clustered`` (True on a stochastic operator: the error is over block products).
    """

    estimate: float
    std_error: float
    num_products: int
    num_probes: int
    method: str
    converged: bool = True
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0))
    info: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.estimate)

    def confidence_interval(self, z: float = 1.96) -> tuple[float, float]:
        """``(estimate - z * std_error, estimate + z * std_error)``; z=1.96 is a 95% interval."""
        return (self.estimate - z * self.std_error, self.estimate + z * self.std_error)


def _sample_stats(blocks: list[np.ndarray], clustered: bool = False) -> tuple[float, float]:
    """(mean, standard error of the mean) of the samples, which came in ``blocks`` (one product each).

    With ``clustered`` (a stochastic operator: each block product used its own mini-batch, shared by
    the block's probes) the samples of a block are not independent, and the error is the
    cluster-robust one over blocks, ``sqrt(B / (B - 1) * sum_b (S_b - m_b * mean)^2) / N`` for B
    blocks of m_b samples summing to S_b; with blocks of one sample it is the ordinary one. The
    error is inf below two samples (two blocks when clustered).
    """
    samples = np.concatenate(blocks) if blocks else np.zeros(0)
    mean = float(samples.mean()) if samples.size else 0.0
    if not clustered:
        if samples.size < 2:
            return mean, math.inf
        return mean, float(samples.std(ddof=1) / math.sqrt(samples.size))
    if len(blocks) < 2:
        return mean, math.inf
    sums = np.array([block.sum() for block in blocks])
    sizes = np.array([block.size for block in blocks], dtype=np.float64)
    spread = np.sum((sums - sizes * mean) ** 2) * len(blocks) / (len(blocks) - 1)
    return mean, float(math.sqrt(spread) / samples.size)


def _hutchinson_loop(
    operator: Operator,
    budget: int,
    make_probes: Callable[[int], Tensor],
    offset: float,
    settings: ProbeSettings,
    bar: Any,
) -> tuple[list[np.ndarray], bool]:
    """Run Hutchinson probes ``z^T A z`` in blocks of ``settings.block_size`` until the standard error
    of ``offset + mean`` is at most ``max(tol, rtol * |offset + mean|)`` (after ``min_probes``) or
    ``budget`` probes.

    Returns the float64 samples of each block product and whether a requested tolerance was met.
    """
    tol, rtol, adaptive = settings.tol, settings.rtol, settings.adaptive
    blocks: list[np.ndarray] = []
    done = 0
    while done < budget:
        count = min(settings.block_size, budget - done)
        probes = make_probes(count)
        values = (probes * operator.apply_block(probes)).sum(dim=0)
        blocks.append(values.detach().to("cpu", torch.float64).numpy())
        done += count
        bar.update(count)
        if adaptive and done >= settings.min_probes:
            mean, se = _sample_stats(blocks, operator.is_stochastic)
            target = max(tol or 0.0, (rtol or 0.0) * abs(offset + mean))
            bar.set_postfix(estimate=f"{offset + mean:.4g}", std_error=f"{se:.2g}")
            if se <= target:
                return blocks, True
    return blocks, not adaptive


def _warn_budget(method: str, result: TraceEstimate, tol: Optional[float], rtol: Optional[float]) -> None:
    wanted = " or ".join(
        s for s in (f"tol={tol:g}" if tol is not None else "", f"rtol={rtol:g}" if rtol is not None else "") if s
    )
    warnings.warn(
        f"{method}: the budget of {result.num_products} products ran out with standard error "
        f"{result.std_error:.3g} (estimate {result.estimate:.6g}), above the requested {wanted}. "
        f"Raise max_products (the error falls like 1/sqrt(products)) or loosen the tolerance.",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


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
        distribution: "rademacher" (default, lower variance) or "gaussian".
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
        blocks, met = _hutchinson_loop(op, settings.max_products, lambda b: settings.draw(op, b), 0.0, settings, bar)
    mean, se = _sample_stats(blocks, op.is_stochastic)
    samples = np.concatenate(blocks)
    result = TraceEstimate(
        mean, se, op.num_products - first, samples.size, "hutchinson", met, samples,
        info={"distribution": settings.distribution, "clustered": op.is_stochastic},
    )
    if not met:
        _warn_budget("hutchinson_trace", result, tol, rtol)
    logger.info("hutchinson_trace: %.6g +- %.2g with %d products.", mean, se, result.num_products)
    return result


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
    if op.is_stochastic:
        raise ValueError(
            "hutchpp_trace needs a deterministic operator: its exact part tr(Q^T A Q) comes from one product, "
            "whose mini-batch noise its standard error cannot see. Build the operator with full_dataset=True, "
            "or use hutchinson_trace, whose standard error includes the mini-batch noise."
        )
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    max_products = settings.max_products
    n = op.size
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
    first = op.num_products
    total = 2 * s if s == n else max_products
    with progress(total=total, desc="trace (Hutch++)", verbose=verbose) as bar:
        sketch = settings.draw(op, s)
        basis, _ = torch.linalg.qr(op.apply_block(sketch))
        bar.update(s)
        exact_part = float(torch.einsum("ij,ij->", basis, op.apply_block(basis)).double())
        bar.update(s)

        def deflated_probes(count: int) -> Tensor:
            probes = settings.draw(op, count)
            return probes - basis @ (basis.T @ probes)

        if s == n:  # Q spans the whole space: the trace is exact
            blocks, met = [], True
        else:
            blocks, met = _hutchinson_loop(op, max_products - 2 * s, deflated_probes, exact_part, settings, bar)
    mean, se = _sample_stats(blocks)
    samples = np.concatenate(blocks) if blocks else np.zeros(0)
    if s == n:
        se = 0.0
    result = TraceEstimate(
        exact_part + mean, se, op.num_products - first, samples.size, "hutch++", met, samples,
        info={"exact_part": exact_part, "sketch_size": s, "distribution": settings.distribution},
    )
    if not met:
        _warn_budget("hutchpp_trace", result, tol, rtol)
    logger.info("hutchpp_trace: %.6g +- %.2g with %d products (sketch %d).", result.estimate, se,
                result.num_products, s)
    return result


TRACE_METHODS: dict[str, Callable[..., TraceEstimate]] = {
    "hutchinson": hutchinson_trace,
    "hutch++": hutchpp_trace,
}


def estimate_trace(
    operator: Union[Operator, Tensor, np.ndarray], method: str = "hutch++", **kwargs: Any
) -> TraceEstimate:
    """Trace by ``method`` ("hutch++" or "hutchinson"); ``kwargs`` go to that estimator."""
    if method not in TRACE_METHODS:
        raise ValueError(f"method={method!r} is not known; choose one of {', '.join(map(repr, TRACE_METHODS))}.")
    return TRACE_METHODS[method](operator, **kwargs)
