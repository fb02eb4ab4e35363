"""What the stochastic estimators return: a trace, a squared Frobenius norm or a diagonal, each with
its standard error and the cost of obtaining it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor


@dataclass
class TraceEstimate:
    """A trace estimate and how it was obtained.

    Attributes:
        estimate: the trace estimate (float).
        std_error: its standard error (the standard deviation of the estimator, estimated from
            the probes; ``inf`` with fewer than two probes). About 95% of estimates lie within
            ``1.96 * std_error`` of the true trace.
        num_products: operator-vector products used.
        num_probes: Hutchinson probes (for Hutch++: the probes of the residual phase; for XTrace:
            its test vectors).
        method: "hutchinson", "hutch++" or "xtrace".
        converged: False when a requested ``tol`` / ``rtol`` was not reached within the budget.
        samples: (num_probes,) float64 array of the per-probe values whose mean is the estimate:
            ``z^T A z`` for Hutchinson; for Hutch++ those of the residual operator, to which
            ``info["exact_part"]`` is added; for XTrace the exchangeable replicates.
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


@dataclass
class FrobeniusEstimate(TraceEstimate):
    """An estimate of the squared Frobenius norm ``||A||_F^2 = tr(A^2)`` (the sum of the squared
    eigenvalues), with the fields of :class:`TraceEstimate`; ``samples`` are ``||A z||^2`` (of the
    deflated probes for Hutch++, the exchangeable replicates for XTrace)."""

    @property
    def norm(self) -> float:
        """``||A||_F``, the square root of the estimate (0 if the estimate is negative)."""
        return math.sqrt(max(self.estimate, 0.0))

    @property
    def norm_std_error(self) -> float:
        """Standard error of :attr:`norm` to first order: ``std_error / (2 ||A||_F)``."""
        return self.std_error / (2 * self.norm) if self.norm > 0 else math.inf


@dataclass
class DiagonalEstimate:
    """An estimate of ``diag(A)`` and how it was obtained.

    Attributes:
        diagonal: (n,) tensor on the operator's device and dtype, laid out like the operator's
            vectors (for a model operator, ``op.unflatten(d)`` splits it by parameter).
        std_error: (n,) standard error of each entry (zeros for the exact diagonal; ``inf``
            with fewer than two probes).
        num_products: operator-vector products used.
        num_probes: probes used (n for the exact diagonal; the test vectors for XDiag).
        method: "hutchinson", "xdiag" or "exact".
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
