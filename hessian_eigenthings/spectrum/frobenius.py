"""The squared Frobenius norm ``||A||_F^2 = tr(A^2) = sum_i lambda_i^2`` of a symmetric operator.

Hutchinson on ``A^2``: ``||A||_F^2 = E[||A z||^2]`` for probes with ``E[z z^T] = I``, one product
per probe; with Rademacher probes the variance of one sample is ``2 (||A^2||_F^2 - sum_i
(A^2)_ii^2)``. The Hutch++ variant (Meyer, Musco, Musco, Woodruff 2021) takes ``Q``, an orthonormal
basis of ``range(A S)`` for a sketch ``S``, adds the exact ``||A Q||_F^2 = tr(Q^T A^2 Q)`` and
estimates the rest, ``tr((I - QQ^T) A^2 (I - QQ^T))``, by Hutchinson on deflated probes: the large
eigenvalues, which dominate ``sum lambda_i^2`` even more than the trace, land in ``Q``. The
exchangeable variant uses XTrace's leave-one-out bases (Epperly, Tropp and Webber 2024).

Mini-batch operators are refused: ``E||H_b z||^2`` is the norm of the expected Hessian *plus* the
mini-batch variance, a biased answer.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..utils import logger, progress
from .estimates import FrobeniusEstimate
from .montecarlo import monte_carlo, squared_norms, warn_budget
from .probes import check_probe_arguments
from .trace import deflated_estimate, sketch_size_for
from .exchangeable import (
    ExchangeableSketch,
    SketchAlgebra,
    check_exchangeable_budget,
    exchangeable_statistics,
    run_exchangeable,
)

__all__ = [
    "FrobeniusEstimate", "hutchinson_frobenius", "hutchpp_frobenius", "xtrace_frobenius", "estimate_frobenius",
    "FROBENIUS_METHODS",
]


def check_not_stochastic(op: Operator, caller: str) -> None:
    """Refuse a mini-batch operator: the squared norm of its products is biased upwards by its noise."""
    if op.is_stochastic:
        raise ValueError(
            f"{caller} needs a deterministic operator: on a mini-batch operator E||H_b z||^2 is ||E[H_b]||_F^2 "
            f"plus the mini-batch variance, a biased estimate. Build the operator with full_dataset=True."
        )


@runs_frozen
def hutchinson_frobenius(
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
) -> FrobeniusEstimate:
    """``||A||_F^2`` of a symmetric operator by Hutchinson's estimator on ``A^2``: the mean of ``||A z||^2``.

    Args:
        operator: an :class:`Operator` or a dense symmetric matrix; deterministic.
        max_products, tol, rtol, distribution, min_probes, block_size, seed, verbose: as in
            :func:`~hessian_eigenthings.hutchinson_trace` (the tolerances are in units of ``||A||_F^2``).

    Returns:
        A :class:`FrobeniusEstimate` (``.estimate`` is ``||A||_F^2``, ``.norm`` its square root).
    """
    op = as_operator(operator)
    check_not_stochastic(op, "hutchinson_frobenius")
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    first = op.num_products
    with progress(total=settings.max_products, desc="Frobenius norm (Hutchinson)", verbose=verbose) as bar:
        run = monte_carlo(op, lambda b: settings.draw(op, b), squared_norms, settings.max_products, settings, bar,
                          keep_samples=True)
    result = FrobeniusEstimate(
        float(run.mean[0]), float(run.std_error[0]), op.num_products - first, run.num_samples, "hutchinson",
        run.converged, run.samples, info={"distribution": settings.distribution},
    )
    if not result.converged:
        warn_budget("hutchinson_frobenius", result, tol, rtol, "1/sqrt(products)")
    logger.info("hutchinson_frobenius: %.6g +- %.2g with %d products.", result.estimate, result.std_error,
                result.num_products)
    return result


@runs_frozen
def hutchpp_frobenius(
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
) -> FrobeniusEstimate:
    """``||A||_F^2`` by the Hutch++ variant: ``||A Q||_F^2`` exactly plus Hutchinson on deflated probes.

    Args:
        operator: an :class:`Operator` or a dense symmetric matrix; deterministic.
        max_products, tol, rtol, sketch_size, distribution, min_probes, block_size, seed, verbose: as in
            :func:`~hessian_eigenthings.hutchpp_trace`.

    Returns:
        A :class:`FrobeniusEstimate`; ``info["exact_part"]`` is ``||A Q||_F^2``.
    """
    op = as_operator(operator)
    check_not_stochastic(op, "hutchpp_frobenius")
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    s = sketch_size_for(sketch_size, settings, op.size)
    first = op.num_products
    total = 2 * s if s == op.size else settings.max_products
    with progress(total=total, desc="Frobenius norm (Hutch++)", verbose=verbose) as bar:
        exact_part, run = deflated_estimate(
            op, settings, s, lambda q, aq: float(aq.double().square().sum()), squared_norms, bar
        )
    if run is None:
        mean, se, samples, met = 0.0, 0.0, np.zeros(0), True
    else:
        mean, se, samples, met = float(run.mean[0]), float(run.std_error[0]), run.samples, run.converged
    result = FrobeniusEstimate(
        exact_part + mean, se, op.num_products - first, samples.size, "hutch++", met, samples,
        info={"exact_part": exact_part, "sketch_size": s, "distribution": settings.distribution},
    )
    if not met:
        warn_budget("hutchpp_frobenius", result, tol, rtol, "1/sqrt(products), faster on spectra with a few "
                    "large eigenvalues")
    logger.info("hutchpp_frobenius: %.6g +- %.2g with %d products (sketch %d).", result.estimate, se,
                result.num_products, s)
    return result


@runs_frozen
def xtrace_frobenius(
    operator: Union[Operator, Tensor, np.ndarray],
    max_products: int = 100,
    tol: Optional[float] = None,
    rtol: Optional[float] = None,
    *,
    distribution: str = "sphere",
    min_probes: int = 10,
    block_size: int = 16,
    seed: Optional[int] = 0,
    verbose: bool = True,
) -> FrobeniusEstimate:
    """``||A||_F^2`` by the exchangeable (XTrace-style) estimator: for each test vector, ``||A Q_i||_F^2``
    for the basis ``Q_i`` of the other test vectors' products, plus ``||A (I - Q_i Q_i^T) w_i||^2``.

    Args:
        operator: an :class:`Operator` or a dense symmetric matrix; deterministic.
        max_products, tol, rtol, distribution, min_probes, block_size, seed, verbose: as in
            :func:`~hessian_eigenthings.xtrace`.

    Returns:
        A :class:`FrobeniusEstimate` with ``method="xtrace"``; ``samples`` are the m replicates.
    """
    op = as_operator(operator)
    check_not_stochastic(op, "xtrace_frobenius")
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    check_exchangeable_budget(settings, op.size, "xtrace_frobenius")
    first = op.num_products

    def estimate(sketch: ExchangeableSketch, algebra: SketchAlgebra) -> tuple[Tensor, Tensor, Tensor]:
        values, deltas = algebra.frobenius(settings.distribution, sketch.gram(sketch.products, sketch.products))
        mean, se, paper = exchangeable_statistics(values.unsqueeze(0), (deltas * deltas.T).sum().reshape(1))
        return mean, se, (values, paper)

    def exact(sketch: ExchangeableSketch) -> Tensor:
        return sketch.gram_diagonal(sketch.products).sum().reshape(1)

    mean, se, extras, m, converged = run_exchangeable(op, settings, estimate, exact, "Frobenius norm (XTrace)",
                                                      verbose)
    values, paper = extras if extras is not None else (mean.new_zeros(0), torch.zeros_like(se))
    result = FrobeniusEstimate(
        float(mean[0]), float(se[0]), op.num_products - first, m, "xtrace", converged, values.cpu().numpy(),
        info={"distribution": settings.distribution, "test_vectors": m, "paper_std_error": float(paper[0])},
    )
    if not converged:
        warn_budget("xtrace_frobenius", result, tol, rtol, "1/sqrt(products), faster on spectra with a few "
                    "large eigenvalues")
    logger.info("xtrace_frobenius: %.6g +- %.2g with %d products.", result.estimate, result.std_error,
                result.num_products)
    return result


FROBENIUS_METHODS: dict[str, Callable[..., FrobeniusEstimate]] = {
    "hutchinson": hutchinson_frobenius,
    "hutch++": hutchpp_frobenius,
    "xtrace": xtrace_frobenius,
}


def estimate_frobenius(
    operator: Union[Operator, Tensor, np.ndarray], method: str = "hutch++", **kwargs: Any
) -> FrobeniusEstimate:
    """``||A||_F^2`` by ``method`` ("hutch++", "hutchinson" or "xtrace"); ``kwargs`` go to that estimator."""
    if method not in FROBENIUS_METHODS:
        raise ValueError(
            f"method={method!r} is not known; choose one of {', '.join(map(repr, FROBENIUS_METHODS))}."
        )
    return FROBENIUS_METHODS[method](operator, **kwargs)
