"""The diagonal of a symmetric operator: stochastic (with a standard error per entry) or exact.

Stochastic (Bekas, Kokiopoulou, Saad 2007): ``diag(A) = E[z * (A z)]`` for probes with
``E[z z^T] = I``. With Rademacher probes the variance of entry i of one sample is
``sum_{j != i} A_ij^2`` (a diagonal matrix is recovered exactly by one probe); with Gaussian
probes it is ``sum_j A_ij^2 + A_ii^2``.

Exact: ``A_ii = e_i^T A e_i`` from n products with the unit vectors, in blocks; it needs no
dense matrix, so it works for any operator whose n products are affordable (small models).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..solvers.result import ConvergenceWarning
from ..utils import check_positive_int, logger, progress, user_stacklevel
from .probes import check_deterministic, check_probe_arguments, unit_blocks


@dataclass
class DiagonalEstimate:
    """An estimate of ``diag(A)`` and how it was obtained.

    Attributes:
        diagonal: (n,) tensor on the operator's device and dtype, laid out like the operator's
            vectors (for a model operator, ``op.unflatten(d)`` splits it by parameter).
        std_error: (n,) standard error of each entry (zeros for the exact diagonal; ``inf``
            with fewer than two probes).
        num_products: operator-vector products used.
        num_probes: probes used (n for the exact diagonal).
        method: "hutchinson" or "exact".
        converged: False when a requested ``tol`` / ``rtol`` was not reached within the budget.
        info: extras (the probe distribution).
    """

    diagonal: Tensor
    std_error: Tensor
    num_products: int
    num_probes: int
    method: str
    converged: bool = True
    info: dict = field(default_factory=dict)

    def trace(self) -> float:
        """The sum of the diagonal, the trace estimate it implies."""
        return float(self.diagonal.double().sum())


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
        distribution: "rademacher" (default; exact on a diagonal matrix) or "gaussian".
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
    max_products, adaptive = settings.max_products, settings.adaptive
    first = op.num_products
    stat_dtype = torch.float64 if op.device.type != "mps" else torch.float32
    moments = _BlockMoments(op.size, stat_dtype, op.device, clustered=op.is_stochastic)
    met = not adaptive
    with progress(total=max_products, desc="diagonal (Hutchinson)", verbose=verbose) as bar:
        while moments.count < max_products:
            b = min(settings.block_size, max_products - moments.count)
            probes = settings.draw(op, b)
            moments.add((probes * op.apply_block(probes)).to(stat_dtype))
            bar.update(b)
            if adaptive and moments.count >= settings.min_probes:
                se = moments.std_error()
                ok_abs = tol is not None and bool(se.max() <= tol)
                ok_rel = rtol is not None and bool(
                    torch.linalg.vector_norm(se) <= rtol * torch.linalg.vector_norm(moments.mean)
                )
                if ok_abs or ok_rel:
                    met = True
                    break
    mean, se, count = moments.mean, moments.std_error(), moments.count
    result = DiagonalEstimate(
        mean.to(op.dtype), se.to(op.dtype), op.num_products - first, count, "hutchinson", met,
        info={"distribution": settings.distribution, "clustered": op.is_stochastic},
    )
    if not met:
        warnings.warn(
            f"hutchinson_diagonal: the budget of {result.num_products} products ran out with max standard "
            f"error {float(se.max()):.3g} and ||std_error|| / ||diagonal|| = "
            f"{float(torch.linalg.vector_norm(se) / torch.linalg.vector_norm(mean).clamp_min(1e-300)):.3g}, "
            f"above the requested tolerance. Raise max_products (errors fall like 1/sqrt(products)) or "
            f"loosen tol/rtol.",
            ConvergenceWarning,
            stacklevel=user_stacklevel(),
        )
    logger.info("hutchinson_diagonal: %d probes, max standard error %.3g.", count, float(se.max()))
    return result


class _BlockMoments:
    """Running per-entry mean and standard error of samples that arrive as (n, b) blocks, in float64.

    Independent samples: mean and sum of squared deviations by Chan et al.'s block update (no
    cancellation of sum-of-squares formulas when entries are large). ``clustered``: each block came
    from one product of a stochastic operator (one mini-batch shared by its probes), so the error is
    the cluster-robust one over blocks, ``sqrt(B / (B - 1) * sum_b m_b^2 (mean_b - mean)^2) / N``,
    accumulated around the first block's mean for the same reason.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, clustered: bool) -> None:
        self.clustered = clustered
        self.mean = torch.zeros(n, dtype=dtype, device=device)
        self.m2 = torch.zeros_like(self.mean)
        self.count = 0
        self.blocks = 0
        # clustered: with d_b = mean_b - shift, the sums of m_b^2 d_b, m_b^2 d_b^2 and m_b^2
        self.shift: Optional[Tensor] = None
        self.w2_d = torch.zeros_like(self.mean)
        self.w2_d2 = torch.zeros_like(self.mean)
        self.w2 = 0.0

    def add(self, values: Tensor) -> None:
        """Take in a block of samples, (n, b)."""
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
        """(n,) standard errors of the entries of ``mean``; inf below two samples (two blocks when clustered)."""
        if not self.clustered:
            if self.count < 2:
                return torch.full_like(self.m2, math.inf)
            return torch.sqrt(self.m2 / (self.count - 1) / self.count)
        if self.blocks < 2:
            return torch.full_like(self.m2, math.inf)
        offset = self.mean - self.shift
        spread = (self.w2_d2 - 2 * offset * self.w2_d + offset**2 * self.w2).clamp_min(0)
        return torch.sqrt(spread * (self.blocks / (self.blocks - 1))) / self.count


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
