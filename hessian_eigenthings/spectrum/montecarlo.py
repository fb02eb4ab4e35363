"""The one Monte-Carlo loop of the probe-based estimators.

An estimator is a ``sampler`` (count -> an (n, count) block of probe vectors) and an ``integrand``
((probes, A @ probes) -> a (d, count) block of samples whose expectation is the quantity wanted):
``z^T A z`` for a trace, ``z * (A z)`` for a diagonal, ``||A z||^2`` for a squared Frobenius norm.
:func:`monte_carlo` draws probes in blocks, makes one block product per block, keeps running
per-entry statistics of the samples in float64 on the operator's device, and stops once the
standard error reaches the requested ``tol`` / ``rtol`` or the budget runs out.

On a stochastic operator (one mini-batch per block product, shared by the block's probes) the
samples of one block are not independent, so the standard error is the cluster-robust one over
blocks; with blocks of one probe it is the ordinary one.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator
from ..solvers.result import ConvergenceWarning
from ..utils import user_stacklevel
from .probes import ProbeSettings

Sampler = Callable[[int], Tensor]
Integrand = Callable[[Tensor, Tensor], Tensor]


def quadratic_forms(probes: Tensor, products: Tensor) -> Tensor:
    """``z^T A z`` for each probe, shape (1, b): Hutchinson's trace samples."""
    return (probes * products).sum(dim=0, keepdim=True)


def elementwise_products(probes: Tensor, products: Tensor) -> Tensor:
    """``z * (A z)``, shape (n, b): the diagonal samples of Bekas, Kokiopoulou and Saad (2007)."""
    return probes * products


def squared_norms(probes: Tensor, products: Tensor) -> Tensor:
    """``||A z||^2 = z^T A^2 z`` for each probe, shape (1, b): samples of ``tr(A^2) = ||A||_F^2``."""
    return products.square().sum(dim=0, keepdim=True)


def statistics_dtype(device: torch.device) -> torch.dtype:
    """float64 for running statistics, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


class SampleMoments:
    """Running per-entry mean and standard error of (d,) samples that arrive in (d, b) blocks.

    Independent samples: mean and sum of squared deviations by Chan et al.'s block update (no
    cancellation of sum-of-squares formulas when entries are large). ``clustered``: each block came
    from one product of a stochastic operator (one mini-batch shared by its probes), so the error is
    the cluster-robust one over blocks, ``sqrt(B / (B - 1) * sum_b m_b^2 (mean_b - mean)^2) / N``
    for B blocks of m_b samples, N in all; it is accumulated around the first block's mean for the
    same reason.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, clustered: bool) -> None:
        self.clustered = clustered
        self.mean = torch.zeros(dim, dtype=dtype, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self.count = 0
        self.blocks = 0
        # clustered: with d_b = mean_b - shift, the sums of m_b^2 d_b, m_b^2 d_b^2 and m_b^2
        self.shift: Optional[Tensor] = None
        self.w2_d = torch.zeros_like(self.mean)
        self.w2_d2 = torch.zeros_like(self.mean)
        self.w2 = 0.0

    def add(self, values: Tensor) -> None:
        """Take in a block of samples, (d, b), already in this object's dtype and device."""
        b = values.shape[1]
        block_mean = values.mean(dim=1)
        delta = block_mean - self.mean
        total = self.count + b
        self.mean += delta * (b / total)
        self.m2 += ((values - block_mean.unsqueeze(1)) ** 2).sum(dim=1) + delta**2 * (self.count * b / total)
        self.count = total
        self.blocks += 1
        if self.clustered:
            if self.shift is None:
                self.shift = block_mean.clone()
            d = block_mean - self.shift
            self.w2_d += b * b * d
            self.w2_d2 += b * b * d * d
            self.w2 += b * b

    def std_error(self) -> Tensor:
        """(d,) standard errors of the entries of ``mean``; inf below two samples (two blocks when
        clustered)."""
        if not self.clustered:
            if self.count < 2:
                return torch.full_like(self.m2, math.inf)
            return torch.sqrt(self.m2 / (self.count - 1) / self.count)
        if self.blocks < 2:
            return torch.full_like(self.m2, math.inf)
        offset = self.mean - self.shift
        spread = (self.w2_d2 - 2 * offset * self.w2_d + offset**2 * self.w2).clamp_min(0)
        return torch.sqrt(spread * (self.blocks / (self.blocks - 1))) / self.count


def tolerance_met(std_error: Tensor, estimate: Tensor, tol: Optional[float], rtol: Optional[float]) -> bool:
    """Whether ``max(std_error) <= tol`` or ``||std_error|| <= rtol * ||estimate||`` (either suffices).

    For a scalar (d = 1) this is ``std_error <= max(tol, rtol * |estimate|)``: a negative estimate
    stops exactly where its mirror image does.
    """
    if tol is not None and bool(std_error.max() <= tol):
        return True
    return rtol is not None and bool(
        torch.linalg.vector_norm(std_error) <= rtol * torch.linalg.vector_norm(estimate)
    )


@dataclass
class MonteCarloResult:
    """What :func:`monte_carlo` found.

    Attributes:
        mean: (d,) mean of the samples (float64, on the operator's device; float32 on MPS).
        std_error: (d,) its standard error (cluster-robust on a stochastic operator).
        num_samples: probes used (one product each).
        converged: a requested tolerance was met (True when none was requested).
        samples: for d = 1 with ``keep_samples``, the (num_samples,) float64 samples; else empty.
        clustered: the error is over block products (a stochastic operator).
    """

    mean: Tensor
    std_error: Tensor
    num_samples: int
    converged: bool
    samples: np.ndarray
    clustered: bool


def monte_carlo(
    operator: Operator,
    sampler: Sampler,
    integrand: Integrand,
    budget: int,
    settings: ProbeSettings,
    bar: Any,
    *,
    offset: Union[float, Tensor] = 0.0,
    keep_samples: bool = False,
) -> MonteCarloResult:
    """Average ``integrand(z, A z)`` over probes ``z = sampler(b)``, drawn in blocks of
    ``settings.block_size``, one block product each.

    Stops after ``budget`` probes, or (with ``settings.tol`` / ``settings.rtol``, after at least
    ``settings.min_probes``) once :func:`tolerance_met` holds for the standard error and the estimate
    ``offset + mean`` (``offset`` is the exact part of a deflated estimator such as Hutch++).

    Args:
        operator: the operator of the products; its ``is_stochastic`` makes the error clustered.
        sampler: ``count -> (n, count)`` probes on the operator's device and dtype.
        integrand: ``(probes, products) -> (d, count)`` samples.
        budget: the most probes to use.
        settings: the checked estimator arguments (tolerances, block size, minimum probes).
        bar: a progress bar, advanced by one per product.
        offset: added to the mean for the relative tolerance and for the progress display.
        keep_samples: return the samples themselves (for d = 1).

    Returns:
        A :class:`MonteCarloResult`.
    """
    clustered = operator.is_stochastic
    dtype = statistics_dtype(operator.device)
    moments: Optional[SampleMoments] = None
    kept: list[Tensor] = []
    adaptive = settings.adaptive
    converged = not adaptive
    show = not getattr(bar, "disable", True)
    done = 0
    while done < budget:
        count = min(settings.block_size, budget - done)
        probes = sampler(count)
        values = integrand(probes, operator.apply_block(probes)).detach().to(dtype)
        if moments is None:
            moments = SampleMoments(values.shape[0], dtype, values.device, clustered)
        moments.add(values)
        done += count
        if keep_samples:
            kept.append(values[0])
        bar.update(count)
        # The statistics are read on the host only when a tolerance needs them: on a GPU, a read
        # after every block would make the host wait for each product.
        if adaptive and moments.count >= settings.min_probes:
            std_error = moments.std_error()
            estimate = offset + moments.mean
            if show:
                _describe(bar, estimate, std_error)
            if tolerance_met(std_error, estimate, settings.tol, settings.rtol):
                converged = True
                break
    if moments is None:  # a budget of zero probes
        moments = SampleMoments(1, dtype, operator.device, clustered)
    samples = torch.cat(kept).cpu().numpy() if kept else np.zeros(0)
    return MonteCarloResult(moments.mean, moments.std_error(), moments.count, converged, samples, clustered)


def _describe(bar: Any, estimate: Tensor, std_error: Tensor) -> None:
    if estimate.numel() == 1:
        bar.set_postfix(estimate=f"{float(estimate):.4g}", std_error=f"{float(std_error):.2g}")
    else:
        bar.set_postfix(max_std_error=f"{float(std_error.max()):.2g}")


def warn_unconverged(
    caller: str, num_products: int, reached: str, tol: Optional[float], rtol: Optional[float], rate: str
) -> None:
    """The ConvergenceWarning of an estimator whose budget ran out before its tolerance was met.

    ``reached`` describes the error it did reach; ``rate`` how the error falls with more products.
    """
    wanted = " or ".join(
        s for s in (f"tol={tol:g}" if tol is not None else "", f"rtol={rtol:g}" if rtol is not None else "") if s
    )
    warnings.warn(
        f"{caller}: the budget of {num_products} products ran out with {reached}, above the requested "
        f"{wanted}. Raise max_products (the error falls like {rate}) or loosen the tolerance.",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


def warn_budget(caller: str, result: Any, tol: Optional[float], rtol: Optional[float], rate: str) -> None:
    """:func:`warn_unconverged` for a scalar estimate (a trace or squared Frobenius norm ``result``)."""
    warn_unconverged(
        caller, result.num_products, f"standard error {result.std_error:.3g} (estimate {result.estimate:.6g})",
        tol, rtol, rate,
    )


def warn_diagonal_budget(
    caller: str, num_products: int, mean: Tensor, se: Tensor, tol: Optional[float], rtol: Optional[float], rate: str
) -> None:
    """The ConvergenceWarning of a diagonal estimator whose budget ran out before its tolerance."""
    relative = float(torch.linalg.vector_norm(se) / torch.linalg.vector_norm(mean).clamp_min(1e-300))
    warn_unconverged(
        caller, num_products, f"max standard error {float(se.max()):.3g} and ||std_error|| / ||diagonal|| = "
        f"{relative:.3g}", tol, rtol, rate,
    )
