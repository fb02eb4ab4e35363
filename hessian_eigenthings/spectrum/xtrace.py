"""Exchangeable estimators: XTrace and XDiag (Epperly, Tropp and Webber, 2024, "XTrace: Making the
most of every sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1)).

Hutch++ splits its products between a sketch, whose range ``Q`` gives an exact low-rank part, and
Hutchinson probes of the deflated rest. XTrace uses every test vector for both: for each of its m
test vectors ``w_i`` it takes ``Q_i``, an orthonormal basis of the range of ``A`` applied to the
*other* m - 1 test vectors, and forms the Hutch++-style estimate

    t_i = tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i,

unbiased because ``w_i`` is independent of ``Q_i``. XTrace is their mean, and the spread of the
``t_i`` gives its error estimate ``std(t_i) / sqrt(m)``. All m leave-one-out bases come from one
QR factorisation ``A W = Q R`` and one more block of products ``Z = A Q``: ``range(Q_i)`` is
``range(Q)`` less the unit direction ``Q s_i``, ``s_i`` proportional to ``R^{-T} e_i``, so every
``t_i`` is a formula in m x m matrices. The cost is 2m products, as for Hutch++ with a sketch of m.

For rotation-invariant test vectors ("sphere", "gaussian") the residual vector
``(I - Q_i Q_i^T) w_i`` points in a uniformly random direction of the (n - m + 1)-dimensional
complement; XTrace rescales it to norm ``sqrt(n - m + 1)`` (a Hutchinson probe uniform on that
sphere), which lowers the variance. With these two distributions the estimates coincide.

XDiag applies the same idea to ``diag(A) = diag(Q_i Q_i^T A) + E[w * ((I - Q_i Q_i^T) A w)]``,
with Rademacher test vectors by default, and its per-entry error estimate is the spread of the m
replicates over ``sqrt(m)``. The same machinery estimates ``||A||_F^2`` (``frobenius.py``).

Memory: the test vectors, ``Q`` and ``A Q``, 3 n m numbers on the operator's device. The operator
must be deterministic: one mini-batch per product would make the leave-one-out bases inconsistent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..utils import logger, progress
from .estimates import DiagonalEstimate, TraceEstimate
from .montecarlo import statistics_dtype, tolerance_met, warn_budget, warn_diagonal_budget
from .probes import ProbeSettings, check_deflatable, check_probe_arguments

# Rows per chunk when a Gram matrix of float32 blocks is accumulated in float64.
_GRAM_ROWS = 1 << 16


class ExchangeableSketch:
    """Test vectors ``W`` (n, m), an orthonormal basis ``Q`` of ``range(A W)`` with ``A W = Q R``, and
    ``Z = A Q``, grown a block of test vectors at a time (2 products per test vector).

    ``Q`` is extended by block Gram-Schmidt with reorthogonalisation, so earlier columns of ``Q``
    and ``Z`` never change; the leave-one-out quantities of :meth:`leave_one_out` are then m x m
    computations, in float64 (float32 on MPS).
    """

    def __init__(self, operator: Operator, settings: ProbeSettings, bar: Any) -> None:
        self.op = operator
        self.settings = settings
        self.bar = bar
        n, dtype, device = operator.size, operator.dtype, operator.device
        self.omega = torch.zeros(n, 0, dtype=dtype, device=device)
        self.basis = torch.zeros(n, 0, dtype=dtype, device=device)
        self.products = torch.zeros(n, 0, dtype=dtype, device=device)
        self.r = torch.zeros(0, 0, dtype=dtype, device=device)
        self.stat_dtype = statistics_dtype(device)

    @property
    def m(self) -> int:
        """The number of test vectors so far."""
        return self.omega.shape[1]

    def _apply(self, block: Tensor) -> Tensor:
        """``A @ block`` in block products of at most ``block_size`` columns."""
        step = self.settings.block_size
        pieces = []
        for start in range(0, block.shape[1], step):
            pieces.append(self.op.apply_block(block[:, start : start + step]))
            self.bar.update(pieces[-1].shape[1])
        return torch.cat(pieces, dim=1)

    def grow(self, count: int) -> None:
        """Draw ``count`` more test vectors and extend ``Q``, ``R`` and ``Z`` (2 * count products)."""
        omega = self.settings.draw(self.op, count)
        y = self._apply(omega)
        old = self.basis
        if old.shape[1] == 0:
            q, r_new = torch.linalg.qr(y)
            top = y.new_zeros(0, count)
        else:
            top = old.T @ y
            y = y - old @ top
            again = old.T @ y
            y = y - old @ again
            top = top + again
            q, r_new = torch.linalg.qr(y)
            # When y is (nearly) in range(old), q comes from rounding noise and need not be
            # orthogonal to old: project once more and fold the change into R.
            fix = old.T @ q
            q, r_fix = torch.linalg.qr(q - old @ fix)
            top = top + fix @ r_new
            r_new = r_fix @ r_new
        m = self.m
        r = self.r.new_zeros(m + count, m + count)
        r[:m, :m] = self.r
        r[:m, m:] = top
        r[m:, m:] = r_new
        self.r = r
        self.omega = torch.cat([self.omega, omega], dim=1)
        self.basis = torch.cat([old, q], dim=1)
        self.products = torch.cat([self.products, self._apply(q)], dim=1)

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        """``a^T b`` in the statistics dtype (float64 accumulation for lower-precision blocks)."""
        if a.dtype == self.stat_dtype:
            return a.T @ b
        out = torch.zeros(a.shape[1], b.shape[1], dtype=self.stat_dtype, device=a.device)
        for start in range(0, a.shape[0], _GRAM_ROWS):
            stop = start + _GRAM_ROWS
            out += a[start:stop].to(self.stat_dtype).T @ b[start:stop].to(self.stat_dtype)
        return out

    def leave_one_out(self) -> "LeaveOneOut":
        """The m x m quantities shared by the exchangeable estimators (see :class:`LeaveOneOut`)."""
        r = self.r.to(self.stat_dtype)
        m = r.shape[0]
        # R is singular only when A W is exactly rank deficient (A w_i = 0, say); a tiny pivot then
        # points s_i at the corresponding basis vector, a direction A does not reach.
        pivots = r.diagonal()
        floor = float(pivots.abs().max()) * torch.finfo(self.stat_dtype).eps if m else 0.0
        safe = torch.where(pivots.abs() > floor, pivots, torch.full_like(pivots, max(floor, 1e-300)))
        r_safe = r.clone()
        r_safe.diagonal().copy_(safe)
        eye = torch.eye(m, dtype=self.stat_dtype, device=r.device)
        r_inv_t = torch.linalg.solve_triangular(r_safe, eye, upper=True).T
        s = r_inv_t / torch.linalg.vector_norm(r_inv_t, dim=0, keepdim=True)
        w = self.gram(self.basis, self.omega)
        k = self.gram(self.basis, self.products)
        h = (k + k.T) / 2
        t = self.gram(self.products, self.omega)
        c = (s * w).sum(dim=0)
        u = w - s * c
        omega_sq = self.gram_diagonal(self.omega)
        remaining = omega_sq - w.square().sum(dim=0) + c.square()
        return LeaveOneOut(r, s, w, k, h, t, c, u, remaining, self.op.size, m)

    def gram_diagonal(self, a: Tensor) -> Tensor:
        """Squared column norms of ``a`` in the statistics dtype."""
        if a.dtype == self.stat_dtype:
            return a.square().sum(dim=0)
        out = torch.zeros(a.shape[1], dtype=self.stat_dtype, device=a.device)
        for start in range(0, a.shape[0], _GRAM_ROWS):
            out += a[start : start + _GRAM_ROWS].to(self.stat_dtype).square().sum(dim=0)
        return out


@dataclass
class LeaveOneOut:
    """The m x m quantities of the leave-one-out bases (columns i belong to test vector i).

    ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T``; ``w_i = Q^T omega_i``; ``c_i = s_i^T w_i``;
    ``u_i = w_i - c_i s_i``, so that ``(I - Q_i Q_i^T) omega_i = omega_i - Q u_i``; ``remaining_i``
    is the squared norm of that vector.
    """

    r: Tensor  # A W = Q R
    s: Tensor
    w: Tensor  # Q^T W
    k: Tensor  # Q^T A Q
    h: Tensor  # its symmetric part
    t: Tensor  # (A Q)^T W
    c: Tensor
    u: Tensor
    remaining: Tensor
    n: int
    m: int

    def residual_scale(self, distribution: str) -> Tensor:
        """Per test vector, the factor that puts a rotation-invariant residual probe on the sphere of
        radius ``sqrt(n - m + 1)`` of the complement of ``range(Q_i)``; ones for Rademacher probes."""
        if distribution == "rademacher":
            return torch.ones_like(self.c)
        return (self.n - self.m + 1) / self.remaining.clamp_min(torch.finfo(self.remaining.dtype).tiny)

    def trace_replicates(self, distribution: str) -> Tensor:
        """(m,) XTrace replicates ``t_i``."""
        low_rank = self.h.trace() - (self.s * (self.h @ self.s)).sum(dim=0)
        residual = (
            (self.w * self.r).sum(dim=0)  # w_i^T A w_i, as (Q^T w_i)^T (Q^T A w_i)
            - 2 * (self.t * self.u).sum(dim=0)
            + (self.u * (self.h @ self.u)).sum(dim=0)
        )
        return low_rank + self.residual_scale(distribution) * residual

    def frobenius_replicates(self, distribution: str, g: Tensor) -> Tensor:
        """(m,) exchangeable replicates of ``||A||_F^2 = tr(A^2)``, given ``g = Z^T Z``:
        ``||A Q_i||_F^2 + ||A (I - Q_i Q_i^T) w_i||^2`` (the second term rescaled as in XTrace), with
        ``A (I - Q_i Q_i^T) w_i = Q r_i - Z u_i``."""
        low_rank = g.trace() - (self.s * (g @ self.s)).sum(dim=0)
        residual = (
            self.r.square().sum(dim=0)
            - 2 * (self.r * (self.k @ self.u)).sum(dim=0)
            + (self.u * (g @ self.u)).sum(dim=0)
        )
        return low_rank + self.residual_scale(distribution) * residual


def run_exchangeable(
    op: Operator,
    settings: ProbeSettings,
    estimate: Callable[[ExchangeableSketch, LeaveOneOut], tuple[Tensor, Tensor, Tensor]],
    exact: Callable[[ExchangeableSketch], Tensor],
    desc: str,
    verbose: bool,
) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """Grow an :class:`ExchangeableSketch` until the budget or the tolerance is reached.

    ``estimate(sketch, loo)`` returns (mean (d,), std_error (d,), replicates (d, m)). Without a
    tolerance all ``max_products // 2`` test vectors (at most n) are drawn at once; with one, blocks
    of ``block_size`` test vectors are added until :func:`tolerance_met` holds (after
    ``min_probes``). With m = n the basis ``Q`` spans the whole space: the answer is then
    ``exact(sketch)`` (the quantity of ``Q^T A Q``) with standard error 0 and no replicates.

    Returns (mean, std_error, replicates, m, converged).
    """
    n = op.size
    m_max = min(settings.max_products // 2, n)
    with progress(total=2 * m_max, desc=desc, verbose=verbose) as bar:
        sketch = ExchangeableSketch(op, settings, bar)
        converged = not settings.adaptive
        while sketch.m < m_max:
            step = settings.block_size if settings.adaptive else m_max
            sketch.grow(min(step, m_max - sketch.m))
            if settings.adaptive and sketch.m >= max(settings.min_probes, 2) and sketch.m < m_max:
                mean, se, _ = estimate(sketch, sketch.leave_one_out())
                bar.set_postfix(std_error=f"{float(se.max()):.2g}")
                if tolerance_met(se, mean, settings.tol, settings.rtol):
                    converged = True
                    break
        if sketch.m == n:
            mean = exact(sketch)
            return mean, torch.zeros_like(mean), mean.new_zeros(mean.shape[0], 0), n, True
        mean, se, replicates = estimate(sketch, sketch.leave_one_out())
    if settings.adaptive and not converged:
        converged = sketch.m >= max(settings.min_probes, 2) and tolerance_met(se, mean, settings.tol, settings.rtol)
    return mean, se, replicates, sketch.m, converged


def replicate_statistics(replicates: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and error estimate ``std / sqrt(m)`` of (d, m) exchangeable replicates."""
    m = replicates.shape[1]
    mean = replicates.mean(dim=1)
    if m < 2:
        return mean, torch.full_like(mean, math.inf)
    return mean, replicates.std(dim=1) / math.sqrt(m)


def check_exchangeable_budget(settings: ProbeSettings, n: int, caller: str) -> None:
    """At least two test vectors (four products) for an error estimate, unless n = 1."""
    if settings.max_products < 4 and n > 1:
        raise ValueError(
            f"{caller} needs max_products >= 4 (two test vectors, two products each, for an error estimate); "
            f"got max_products={settings.max_products}."
        )


@runs_frozen
def xtrace(
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
) -> TraceEstimate:
    """Trace of a symmetric operator by XTrace (Epperly, Tropp and Webber 2024), with its error estimate.

    Every test vector serves both the low-rank part and the residual estimate (see the module
    docstring), so for the same products it is usually more accurate than Hutch++, and much more so
    on spectra with a few large eigenvalues or a fast decay.

    Args:
        operator: an :class:`Operator` or a dense symmetric matrix; deterministic (ValueError for a
            mini-batch operator, ``full_dataset=False``: use :func:`hutchinson_trace` there).
        max_products: the budget: ``max_products // 2`` test vectors (at most n), two products
            each; at least 4. Without ``tol`` and ``rtol`` all of them are used.
        tol, rtol: add blocks of ``block_size`` test vectors until the error estimate is at most
            ``max(tol, rtol * |estimate|)`` (after ``min_probes`` test vectors).
        distribution: "sphere" (default, the paper's choice: uniform on the sphere of radius
            sqrt(n), with the residual rescaling), "gaussian" (the same estimates) or "rademacher"
            (no rescaling).
        min_probes: test vectors before the error estimate is trusted for stopping.
        block_size: test vectors per block product (and per step with a tolerance).
        seed: seed of the private generator (None: fresh randomness; the global RNG is never touched).
        verbose: show a progress bar.

    Returns:
        A :class:`TraceEstimate` with ``method="xtrace"``; ``num_probes`` is the number m of test
        vectors, ``samples`` the m exchangeable replicates, and ``std_error`` their standard
        deviation over ``sqrt(m)`` (0 when m = n: the trace is then exact).
    """
    op = as_operator(operator)
    check_deflatable(op, "xtrace", "hutchinson_trace")
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    check_exchangeable_budget(settings, op.size, "xtrace")
    first = op.num_products

    def estimate(sketch: ExchangeableSketch, loo: LeaveOneOut) -> tuple[Tensor, Tensor, Tensor]:
        replicates = loo.trace_replicates(settings.distribution).unsqueeze(0)
        return (*replicate_statistics(replicates), replicates)

    def exact(sketch: ExchangeableSketch) -> Tensor:
        return sketch.gram(sketch.basis, sketch.products).trace().reshape(1)

    mean, se, replicates, m, converged = run_exchangeable(op, settings, estimate, exact, "trace (XTrace)", verbose)
    result = TraceEstimate(
        float(mean[0]), float(se[0]), op.num_products - first, m, "xtrace", converged,
        replicates[0].cpu().numpy(), info={"distribution": settings.distribution, "test_vectors": m},
    )
    if not converged:
        warn_budget("xtrace", result, tol, rtol, "1/sqrt(products), faster on spectra with a few large eigenvalues")
    logger.info("xtrace: %.6g +- %.2g with %d products.", result.estimate, result.std_error, result.num_products)
    return result


def diagonal_replicate_statistics(sketch: ExchangeableSketch, loo: LeaveOneOut) -> tuple[Tensor, Tensor]:
    """Per-entry mean and error estimate of the XDiag replicates

        d_i = diag(Q_i Q_i^T A) + w_i * ((I - Q_i Q_i^T) A w_i)
            = diag(Q Z^T) - (Q s_i) * (Z s_i) + w_i * (Q s_i) (s_i^T r_i),

    (``A w_i = Q r_i`` lies in ``range(Q)``), computed in row chunks so that only a chunk of the
    (n, m) replicates exists at a time.
    """
    dtype = sketch.stat_dtype
    n, m = sketch.op.size, loo.m
    weight = (loo.s * loo.r).sum(dim=0)  # s_i^T r_i
    mean = torch.empty(n, dtype=dtype, device=loo.s.device)
    se = torch.empty_like(mean)
    for start in range(0, n, _GRAM_ROWS):
        stop = min(start + _GRAM_ROWS, n)
        q = sketch.basis[start:stop].to(dtype)
        z = sketch.products[start:stop].to(dtype)
        qs = q @ loo.s
        rows = (q * z).sum(dim=1, keepdim=True) - qs * (z @ loo.s) + sketch.omega[start:stop].to(dtype) * qs * weight
        mean[start:stop], se[start:stop] = replicate_statistics(rows)
    if m < 2:
        se.fill_(math.inf)
    return mean, se


def exact_diagonal_of_sketch(sketch: ExchangeableSketch) -> Tensor:
    """``diag(Q Z^T) = diag(Q Q^T A)``, which is ``diag(A)`` once ``Q`` spans the whole space."""
    dtype = sketch.stat_dtype
    return torch.cat([
        (sketch.basis[start : start + _GRAM_ROWS].to(dtype) * sketch.products[start : start + _GRAM_ROWS].to(dtype))
        .sum(dim=1)
        for start in range(0, sketch.op.size, _GRAM_ROWS)
    ])


@runs_frozen
def xdiag(
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
    """Diagonal of a symmetric operator by XDiag (Epperly, Tropp and Webber 2024), with per-entry
    error estimates.

    Args:
        operator: an :class:`Operator` or a dense symmetric matrix; deterministic (ValueError for a
            mini-batch operator: use :func:`hutchinson_diagonal` there).
        max_products: the budget: ``max_products // 2`` test vectors (at most n), two products each;
            at least 4. Without ``tol`` and ``rtol`` all of them are used.
        tol: add test vectors until every entry's error estimate is at most ``tol``.
        rtol: ... until ``||std_error||_2 <= rtol * ||diagonal||_2``. With both, either stops.
        distribution: "rademacher" (default: the residual part is then exact on a diagonal
            matrix), "gaussian" or "sphere".
        min_probes, block_size, seed, verbose: as in :func:`xtrace`.

    Returns:
        A :class:`DiagonalEstimate` with ``method="xdiag"``; ``num_probes`` is the number m of test
        vectors and ``std_error`` the per-entry spread of the m replicates over ``sqrt(m)``.
    """
    op = as_operator(operator)
    check_deflatable(op, "xdiag", "hutchinson_diagonal")
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    check_exchangeable_budget(settings, op.size, "xdiag")
    first = op.num_products

    def estimate(sketch: ExchangeableSketch, loo: LeaveOneOut) -> tuple[Tensor, Tensor, Tensor]:
        mean, se = diagonal_replicate_statistics(sketch, loo)
        return mean, se, mean.new_zeros(0, 0)

    mean, se, _, m, converged = run_exchangeable(op, settings, estimate, exact_diagonal_of_sketch, "diagonal (XDiag)",
                                                 verbose)
    result = DiagonalEstimate(
        mean.to(op.dtype), se.to(op.dtype), op.num_products - first, m, "xdiag", converged,
        info={"distribution": settings.distribution, "test_vectors": m},
    )
    if not converged:
        warn_diagonal_budget("xdiag", result.num_products, mean, se, tol, rtol,
                             "1/sqrt(products), faster on spectra with a few large eigenvalues")
    logger.info("xdiag: %d test vectors, max standard error %.3g.", m, float(se.max()))
    return result
