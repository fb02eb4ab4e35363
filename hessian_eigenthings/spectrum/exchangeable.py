"""Exchangeable estimators: XTrace and XDiag (Epperly, Tropp and Webber, 2024, "XTrace: Making the
most of every sample in stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45(1)).

Hutch++ splits its products between a sketch, whose range ``Q`` gives an exact low-rank part, and
Hutchinson probes of the deflated rest. XTrace uses every test vector for both: for each of its m
test vectors ``w_i`` it takes ``Q_i``, an orthonormal basis of the range of ``A`` applied to the
*other* m - 1 test vectors, and forms the Hutch++-style estimate

    t_i = tr(Q_i^T A Q_i) + w_i^T (I - Q_i Q_i^T) A (I - Q_i Q_i^T) w_i,

unbiased because ``w_i`` is independent of ``Q_i``. XTrace is their mean. All m leave-one-out bases
come from one QR factorisation ``A W = Q R`` and one more block of products ``Z = A Q``:
``range(Q_i)`` is ``range(Q)`` less one unit direction, so every ``t_i`` is a formula in m x m
matrices (:class:`SketchAlgebra`). The cost is 2m products, as for Hutch++ with a sketch of m.

For rotation-invariant test vectors ("sphere", "gaussian") the residual vector
``(I - Q_i Q_i^T) w_i`` points in a uniformly random direction of the (n - m + 1)-dimensional
complement; XTrace rescales it to norm ``sqrt(n - m + 1)`` (a Hutchinson probe uniform on that
sphere), which lowers the variance. With these two distributions the estimates coincide.

Error estimate. The paper's, ``std(t_i) / sqrt(m)``, treats the replicates as independent; they
share test vectors and are positively correlated, so it is optimistic: on our test spectra (200
seeds each; trace, squared Frobenius norm and diagonal, 20 and 60 products) it was 63-97% of the
true RMS error, and its 95% intervals covered the truth 80-94% of the time. Ours adds an unbiased
estimate of that correlation, from the replicates with a second test vector left out of the basis
(see :func:`exchangeable_statistics`): 92-112% of the true RMS error, intervals covering 90-96% of
the time (85% for the Frobenius norm of a fast-decaying spectrum from 20 products, where the 10
replicates are few). The paper's value stays in ``info["paper_std_error"]``.

XDiag applies the same idea to ``diag(A) = diag(Q_i Q_i^T A) + E[w * ((I - Q_i Q_i^T) A w)]``,
with Rademacher test vectors by default, and a per-entry error estimate built the same way. The
same machinery estimates ``||A||_F^2`` (``frobenius.py``).

Memory: the test vectors, ``Q`` and ``A Q``, 3 n m numbers on the operator's device. The operator
must be deterministic: one mini-batch per product would make the leave-one-out bases inconsistent.
"""

from __future__ import annotations

import math
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
# XDiag's covariance term uses the pairs {i, i + k mod m} for k up to this (all pairs for small m).
DIAGONAL_PAIR_OFFSETS = 8
# Rows per chunk of XDiag's (n, m) replicates: small enough to stay in a CPU's cache; on a GPU large,
# to launch few kernels.
_DIAGONAL_ROWS = {"cpu": 1 << 12}


class ExchangeableSketch:
    """Test vectors ``W`` (n, m), an orthonormal basis ``Q`` of ``range(A W)`` with ``A W = Q R``, and
    ``Z = A Q``, grown a block of test vectors at a time (2 products per test vector).

    ``Q`` is extended by block Gram-Schmidt with reorthogonalisation, so earlier columns of ``Q``
    and ``Z`` never change; the leave-one-out quantities of :meth:`algebra` are then m x m
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

    def algebra(self) -> "SketchAlgebra":
        """The m x m quantities shared by the exchangeable estimators (see :class:`SketchAlgebra`)."""
        dtype = self.stat_dtype
        r = self.r.to(dtype)
        m = r.shape[0]
        # R is singular only when A W is exactly rank deficient (A w_i = 0, say); a tiny pivot then
        # points the removed direction at the corresponding basis vector, which A does not reach.
        pivots = r.diagonal()
        floor = float(pivots.abs().max()) * torch.finfo(dtype).eps if m else 0.0
        r_safe = r.clone()
        r_safe.diagonal().copy_(torch.where(pivots.abs() > floor, pivots, torch.full_like(pivots, max(floor, 1e-300))))
        eye = torch.eye(m, dtype=dtype, device=r.device)
        a = torch.linalg.solve_triangular(r_safe, eye, upper=True).T  # R^{-T}: a_k^T R e_l = delta_kl
        w = self.gram(self.basis, self.omega)
        return SketchAlgebra(
            n=self.op.size, m=m, a=a, r=r, w=w, p=a.T @ w, ar=a.T @ r,
            omega_sq=self.gram_diagonal(self.omega), basis_products=self.gram(self.basis, self.products),
        )

    def gram_diagonal(self, a: Tensor) -> Tensor:
        """Squared column norms of ``a`` in the statistics dtype."""
        if a.dtype == self.stat_dtype:
            return a.square().sum(dim=0)
        out = torch.zeros(a.shape[1], dtype=self.stat_dtype, device=a.device)
        for start in range(0, a.shape[0], _GRAM_ROWS):
            out += a[start : start + _GRAM_ROWS].to(self.stat_dtype).square().sum(dim=0)
        return out


class SketchAlgebra:
    """Leave-one-out and leave-two-out bases of an exchangeable sketch, as m x m algebra.

    With ``A W = Q R`` and ``a_k = R^{-T} e_k`` (so ``a_k^T R e_l = delta_kl``), the range of ``A``
    applied to every test vector but ``w_i`` is ``Q (I - E_i) Q^T`` with ``E_i = e_i e_i^T``,
    ``e_i = a_i / |a_i|``; leaving ``w_j`` out as well removes one more unit direction ``f_ij``, the part
    of ``a_j`` orthogonal to ``a_i``. Every replicate is a formula in the coordinates, in ``Q``, of
    the vectors involved, computed for all i (and all pairs i != j) at once.

    Attributes (columns i belong to test vector i; float64, float32 on MPS):
        a: (m, m) the ``a_k`` as columns. r: ``R``. w: ``Q^T W``. p: ``a^T w`` (``p[k, i] = a_k . w_i``).
        ar: ``a^T R``. omega_sq: ``||w_i||^2`` of the test vectors themselves. basis_products: ``Q^T A Q``.
    """

    def __init__(self, n: int, m: int, a: Tensor, r: Tensor, w: Tensor, p: Tensor, ar: Tensor, omega_sq: Tensor,
                 basis_products: Tensor) -> None:
        self.n, self.m = n, m
        self.a, self.r, self.w, self.p, self.ar, self.omega_sq = a, r, w, p, ar, omega_sq
        self.basis_products = basis_products
        gram = a.T @ a
        self.a_sq = gram.diagonal().clone()  # |a_i|^2
        # f_ij = (a_j - gamma_ij a_i) / root_beta_ij, gamma_ij = a_i.a_j / |a_i|^2; pairs whose a_j is
        # (numerically) parallel to a_i get root_beta = inf, so they contribute nothing.
        self.gamma = gram / self.a_sq.unsqueeze(1)
        beta = self.a_sq.unsqueeze(0) - self.gamma * gram
        usable = beta > 1e3 * torch.finfo(a.dtype).eps * self.a_sq.unsqueeze(0)
        usable.fill_diagonal_(False)
        self.root_beta = torch.where(usable, beta.clamp_min(0).sqrt(), torch.full_like(beta, math.inf))
        self.w_sq = w.square().sum(dim=0)

    def _along_e(self, matrix: Tensor) -> Tensor:
        """(m,) ``e_i . x_i`` for vectors ``x_i`` given by their ``a``-coordinates ``matrix[k, i] = a_k . x_i``."""
        return matrix.diagonal() / self.a_sq.sqrt()

    def _along_f(self, matrix: Tensor) -> Tensor:
        """(m, m) ``f_ij . x_i`` at [i, j], for ``matrix[k, i] = a_k . x_i``."""
        return (matrix.T - self.gamma * matrix.diagonal().unsqueeze(1)) / self.root_beta

    def residual_scale(self, distribution: str, remaining: Tensor, removed: int) -> Tensor:
        """The factor that puts a rotation-invariant residual probe on the sphere of radius
        ``sqrt(n - m + removed)`` of the complement of a basis of ``m - removed`` directions, given the
        squared norm ``remaining`` of the projected test vector; ones for Rademacher probes."""
        if distribution == "rademacher":
            return torch.ones_like(remaining)
        return (self.n - self.m + removed) / remaining.clamp_min(torch.finfo(remaining.dtype).tiny)

    def scalar_replicates(self, b: Tensor, lin: Tensor, const: Tensor, distribution: str) -> tuple[Tensor, Tensor]:
        """Replicates of ``tr(Q^T B Q) - tr(E B) + scale * (const_i - 2 l_i . u + u^T B u)`` with ``u`` the
        coordinates of the residual probe, for the leave-one-out bases (m,) and their changes when
        ``w_j`` leaves the basis too, ``deltas[i, j] = t_i - t_i^(-j)`` (m, m).

        ``b`` (m, m) symmetric: ``Q^T A Q`` for the trace, ``Z^T Z`` for ``||A||_F^2``; ``lin`` (m, m) the
        vectors ``l_i`` as columns; ``const`` (m,).
        """
        a, a_norm = self.a, self.a_sq.sqrt()
        ab = a.T @ b
        n_b = ab @ a  # a^T B a
        abw = ab @ self.w  # a^T B w
        alin = a.T @ lin
        wbw = (self.w * (b @ self.w)).sum(dim=0)
        lw = (lin * self.w).sum(dim=0)
        # leave one out: E_i = e_i e_i^T
        ew = self._along_e(self.p)
        el = self._along_e(alin)
        ebe = n_b.diagonal() / self.a_sq
        ebw = self._along_e(abw)
        lu = lw - ew * el
        ubu = wbw - 2 * ew * ebw + ew.square() * ebe
        remaining = self.omega_sq - self.w_sq + ew.square()
        scale = self.residual_scale(distribution, remaining, 1)
        low_rank = b.trace() - ebe
        values = low_rank + scale * (const - 2 * lu + ubu)
        # leave two out: E_i + f_ij f_ij^T, for every ordered pair
        fw = self._along_f(self.p)
        fl = self._along_f(alin)
        fbw = self._along_f(abw)
        fbe = self._along_f(n_b) / a_norm.unsqueeze(1)
        gamma = self.gamma
        fbf = (n_b.diagonal().unsqueeze(0) - 2 * gamma * n_b + gamma.square() * n_b.diagonal().unsqueeze(1))
        fbf = fbf / self.root_beta.square()
        fbu = fbw - ew.unsqueeze(1) * fbe
        lu2 = lu.unsqueeze(1) - fw * fl
        ubu2 = ubu.unsqueeze(1) - 2 * fw * fbu + fw.square() * fbf
        scale2 = self.residual_scale(distribution, remaining.unsqueeze(1) + fw.square(), 2)
        values2 = (low_rank.unsqueeze(1) - fbf) + scale2 * (const.unsqueeze(1) - 2 * lu2 + ubu2)
        deltas = torch.where(torch.isfinite(self.root_beta), values.unsqueeze(1) - values2, torch.zeros_like(values2))
        return values, deltas

    def trace(self, distribution: str, products_omega: Tensor) -> tuple[Tensor, Tensor]:
        """XTrace replicates and their leave-two-out changes (see :meth:`scalar_replicates`), given
        ``products_omega = (A Q)^T W``: ``B = Q^T A Q``, ``l_i = Q^T A w_i``, ``const_i = w_i^T A w_i``."""
        h = (self.basis_products + self.basis_products.T) / 2
        return self.scalar_replicates(h, products_omega, (self.w * self.r).sum(dim=0), distribution)

    def frobenius(self, distribution: str, products_gram: Tensor) -> tuple[Tensor, Tensor]:
        """Replicates of ``||A||_F^2``: ``||A Q_i||_F^2 + ||A (I - Q_i Q_i^T) w_i||^2`` with
        ``A (I - Q_i Q_i^T) w_i = Q r_i - Z u``, given ``products_gram = Z^T Z``: ``B = Z^T Z``,
        ``l_i = (Q^T A Q)^T r_i``, ``const_i = ||r_i||^2``."""
        return self.scalar_replicates(products_gram, self.basis_products.T @ self.r, self.r.square().sum(dim=0),
                                      distribution)


def exchangeable_statistics(values: Tensor, cross: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, standard error and the paper's error estimate of (d, m) exchangeable replicates.

    The paper's estimate ``std(t_i) / sqrt(m)`` treats the replicates as independent, but they share
    test vectors and are positively correlated: it is optimistic (see the module docstring).
    The variance of the mean is ``E[S^2] / m + Cov(t_i, t_j)``, and with ``t_i^(-j)`` the replicate
    whose basis leaves out ``w_j`` as well, ``Cov(t_i, t_j) = E[(t_i - t_i^(-j)) (t_j - t_j^(-i))]``:
    ``t_i^(-j)`` has mean ``tr(A)`` over ``w_i`` whatever ``w_j`` is, and does not depend on ``w_j``.
    ``cross`` (d,) is the sum of these products over ordered pairs i != j; its mean estimates the
    covariance without bias and is added, clamped at zero (the covariance is positive in practice).
    """
    m = values.shape[1]
    mean = values.mean(dim=1)
    if m < 2:
        infinite = torch.full_like(mean, math.inf)
        return mean, infinite, infinite
    naive = values.var(dim=1) / m
    covariance = (cross / (m * (m - 1))).clamp_min(0)
    return mean, (naive + covariance).sqrt(), naive.sqrt()


def run_exchangeable(
    op: Operator,
    settings: ProbeSettings,
    estimate: Callable[[ExchangeableSketch, SketchAlgebra], tuple[Tensor, Tensor, Tensor]],
    exact: Callable[[ExchangeableSketch], Tensor],
    desc: str,
    verbose: bool,
) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """Grow an :class:`ExchangeableSketch` until the budget or the tolerance is reached.

    ``estimate(sketch, algebra)`` returns (mean (d,), std_error (d,), extras). Without a
    tolerance all ``max_products // 2`` test vectors (at most n) are drawn at once; with one, blocks
    of ``block_size`` test vectors are added until :func:`tolerance_met` holds (after
    ``min_probes``). With m = n the basis ``Q`` spans the whole space: the answer is then
    ``exact(sketch)`` (the quantity of ``Q^T A Q``) with standard error 0 and no replicates.

    Returns (mean, std_error, extras (None when exact), m, converged).
    """
    n = op.size
    m_max = min(settings.max_products // 2, n)
    with progress(total=2 * m_max, desc=desc, verbose=verbose) as bar:
        sketch = ExchangeableSketch(op, settings, bar)
        while sketch.m < m_max:
            step = settings.block_size if settings.adaptive else m_max
            sketch.grow(min(step, m_max - sketch.m))
            if sketch.m == n:  # Q spans the whole space
                mean = exact(sketch)
                return mean, torch.zeros_like(mean), None, n, True
            trusted = settings.adaptive and sketch.m >= max(settings.min_probes, 2)
            if trusted or sketch.m == m_max:
                mean, se, extras = estimate(sketch, sketch.algebra())
                if trusted:
                    bar.set_postfix(std_error=f"{float(se.max()):.2g}")
                    if tolerance_met(se, mean, settings.tol, settings.rtol):
                        return mean, se, extras, sketch.m, True
    return mean, se, extras, sketch.m, not settings.adaptive


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
        vectors, ``samples`` the m exchangeable replicates, ``std_error`` the error estimate of the
        module docstring (0 when m = n: the trace is then exact) and ``info["paper_std_error"]``
        the paper's ``std(samples) / sqrt(m)``.
    """
    op = as_operator(operator)
    check_deflatable(op, "xtrace", "hutchinson_trace")
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    check_exchangeable_budget(settings, op.size, "xtrace")
    first = op.num_products

    def estimate(sketch: ExchangeableSketch, algebra: SketchAlgebra) -> tuple[Tensor, Tensor, Tensor]:
        values, deltas = algebra.trace(settings.distribution, sketch.gram(sketch.products, sketch.omega))
        mean, se, paper = exchangeable_statistics(values.unsqueeze(0), (deltas * deltas.T).sum().reshape(1))
        return mean, se, (values, paper)

    def exact(sketch: ExchangeableSketch) -> Tensor:
        return sketch.gram(sketch.basis, sketch.products).trace().reshape(1)

    mean, se, extras, m, converged = run_exchangeable(op, settings, estimate, exact, "trace (XTrace)", verbose)
    values, paper = extras if extras is not None else (mean.new_zeros(0), torch.zeros_like(se))
    result = TraceEstimate(
        float(mean[0]), float(se[0]), op.num_products - first, m, "xtrace", converged, values.cpu().numpy(),
        info={"distribution": settings.distribution, "test_vectors": m, "paper_std_error": float(paper[0])},
    )
    if not converged:
        warn_budget("xtrace", result, tol, rtol, "1/sqrt(products), faster on spectra with a few large eigenvalues")
    logger.info("xtrace: %.6g +- %.2g with %d products.", result.estimate, result.std_error, result.num_products)
    return result


def diagonal_statistics(sketch: ExchangeableSketch, algebra: SketchAlgebra) -> tuple[Tensor, Tensor, Tensor]:
    """Per-entry mean, standard error and the paper's error estimate of the XDiag replicates

        d_i = diag(Q_i Q_i^T A) + w_i * ((I - Q_i Q_i^T) A w_i)
            = diag(Q Z^T) - (Q e_i) * (Z e_i) + w_i * (Q e_i) (e_i . r_i)

    (``A w_i = Q r_i`` lies in ``range(Q)``). Leaving ``w_j`` out of the basis as well changes d_i by
    ``(Q f_ij) * (Z f_ij - (f_ij . r_i) w_i)``; the mean of the products of these changes over pairs
    ``{i, j}`` is the covariance term of :func:`exchangeable_statistics`. Any set of pairs gives an
    unbiased mean, so for large m the pairs ``{i, i + k mod m}``, ``k <= DIAGONAL_PAIR_OFFSETS``, are
    used: O(n m) work per offset instead of O(n m^2) for all pairs. Computed in row chunks, so that
    only a chunk of the (n, m) replicates exists at a time.
    """
    dtype = sketch.stat_dtype
    n, m = sketch.op.size, algebra.m
    a, a_sq, gamma, root_beta, ar = algebra.a, algebra.a_sq, algebra.gamma, algebra.root_beta, algebra.ar
    weight = ar.diagonal() / a_sq  # (e_i . r_i) / |a_i|
    if m - 1 <= 2 * DIAGONAL_PAIR_OFFSETS:
        offsets = list(range(1, m))  # every ordered pair: each pair {i, j} twice
    else:
        offsets = list(range(1, DIAGONAL_PAIR_OFFSETS + 1))  # distinct pairs {i, i + k}
    own = torch.arange(m, device=a.device)
    pairs = []
    for k in offsets:
        other = (own + k) % m
        pairs.append((
            other, gamma[own, other], root_beta[own, other], (ar[other, own] - gamma[own, other] * ar[own, own]),
            gamma[other, own], root_beta[other, own], (ar[own, other] - gamma[other, own] * ar[other, other]),
        ))
    outputs = [torch.empty(n, dtype=dtype, device=a.device) for _ in range(3)]
    rows = _DIAGONAL_ROWS.get(a.device.type, 1 << 16)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        q = sketch.basis[start:stop].to(dtype)
        z = sketch.products[start:stop].to(dtype)
        omega = sketch.omega[start:stop].to(dtype)
        qa, za = q @ a, z @ a
        values = (q * z).sum(dim=1, keepdim=True) - qa * za / a_sq + omega * qa * weight
        cross = torch.zeros(stop - start, dtype=dtype, device=a.device)
        for other, g_ij, rb_ij, fr_ij, g_ji, rb_ji, fr_ji in pairs:
            qa_j, za_j, omega_j = qa[:, other], za[:, other], omega[:, other]
            change_i = (qa_j - g_ij * qa) * ((za_j - g_ij * za) - omega * fr_ij) / rb_ij.square()
            change_j = (qa - g_ji * qa_j) * ((za - g_ji * za_j) - omega_j * fr_ji) / rb_ji.square()
            cross += (change_i * change_j).sum(dim=1)
        # the mean over the pairs used, scaled to the sum over all m (m - 1) ordered pairs
        cross *= (m - 1) / len(offsets) if offsets else 0.0
        for output, part in zip(outputs, exchangeable_statistics(values, cross)):
            output[start:stop] = part
    return outputs[0], outputs[1], outputs[2]


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
        distribution: "rademacher" (default; as for Hutchinson's diagonal, the lower variance),
            "gaussian" or "sphere" (no rescaling here: the diagonal's residual term is not a
            quadratic form).
        min_probes, block_size, seed, verbose: as in :func:`xtrace`.

    Returns:
        A :class:`DiagonalEstimate` with ``method="xdiag"``; ``num_probes`` is the number m of test
        vectors, ``std_error`` the per-entry error estimate (the spread of the m replicates with the
        covariance term of the module docstring; zeros when m = n, where the diagonal is exact) and
        ``info["paper_std_error"]`` the paper's ``std / sqrt(m)``.
    """
    op = as_operator(operator)
    check_deflatable(op, "xdiag", "hutchinson_diagonal")
    settings = check_probe_arguments(max_products, tol, rtol, min_probes, block_size, distribution, seed)
    check_exchangeable_budget(settings, op.size, "xdiag")
    first = op.num_products

    mean, se, paper, m, converged = run_exchangeable(
        op, settings, diagonal_statistics, exact_diagonal_of_sketch, "diagonal (XDiag)", verbose
    )
    result = DiagonalEstimate(
        mean.to(op.dtype), se.to(op.dtype), op.num_products - first, m, "xdiag", converged,
        info={"distribution": settings.distribution, "test_vectors": m,
              "paper_std_error": (paper if paper is not None else torch.zeros_like(se)).to(op.dtype)},
    )
    if not converged:
        warn_diagonal_budget("xdiag", result.num_products, mean, se, tol, rtol,
                             "1/sqrt(products), faster on spectra with a few large eigenvalues")
    logger.info("xdiag: %d test vectors, max standard error %.3g.", m, float(se.max()))
    return result
