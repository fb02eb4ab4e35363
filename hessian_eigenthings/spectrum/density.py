"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For a unit start vector q, m Lanczos steps give a tridiagonal T whose eigenvalues (Ritz values)
``theta_j`` and squared first eigenvector components ``w_j`` are the nodes and weights of the
m-point Gauss quadrature of the measure ``sum_i (q^T u_i)^2 delta(t - lambda_i)``. Averaged over
random start vectors, that measure is the spectral density ``(1/n) sum_i delta(t - lambda_i)``.
Each Gauss node is smoothed by a Gaussian of width ``sigma`` to give a density on a grid
(Lin, Saad, Yang 2016; Ghorbani, Krishnan, Xiao 2019; Papyan 2019).

What it preserves: every probe's weights sum to one, so the smoothed density integrates to one;
``sum_j w_j theta_j = q^T A q``, so ``n`` times the mean is Hutchinson's trace estimate with the
same vectors (exactly, for Rademacher start vectors); the extreme Ritz values converge to the
extreme eigenvalues first, so the support of the density is right even for small m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..solvers.krylov import lanczos_tridiagonal_batch
from ..utils import check_positive_int, logger, progress
from .probes import check_distribution, draw_probes, probe_generator
from .trace import TraceEstimate

# Gaussians are negligible beyond this many widths (exp(-8**2 / 2) ~ 1e-14).
_TAIL = 8.0
# Default memory for the Lanczos bases of the probes run together (probes_per_block=None).
BLOCK_MEMORY_BYTES = 1024**3


@dataclass
class SpectralDensity:
    """A smoothed spectral density and the quadrature it was built from.

    Attributes:
        grid: (G,) increasing eigenvalue grid.
        density: (G,) density on the grid (integrates to one over the real line).
        ritz_values: (P, m) Ritz values of each probe, ascending. A probe whose Lanczos run
            stopped early (an invariant subspace) is padded with its largest Ritz value and zero
            weight.
        weights: (P, m) quadrature weights, each row summing to one.
        sigma: width (standard deviation) of the Gaussian put on every Ritz value.
        size: n, the size of the operator (the density is of ``(1/n) sum_i delta(t - lambda_i)``).
        num_products: operator products used.
        info: extras (number of Lanczos steps per probe, probe distribution).
    """

    grid: np.ndarray
    density: np.ndarray
    ritz_values: np.ndarray
    weights: np.ndarray
    sigma: float
    size: int
    num_products: int
    info: dict = field(default_factory=dict)

    @property
    def num_probes(self) -> int:
        """P, the number of start vectors (rows of ``ritz_values``)."""
        return int(self.ritz_values.shape[0])

    @property
    def extremes(self) -> tuple[float, float]:
        """(smallest, largest) Ritz value over all probes: estimates of lambda_min and lambda_max."""
        live = self.weights > 0
        return float(self.ritz_values[live].min()), float(self.ritz_values[live].max())

    def evaluate(self, points: Union[np.ndarray, float], sigma: Optional[float] = None) -> np.ndarray:
        """The smoothed density at ``points`` (any shape), with width ``sigma`` (default: ``self.sigma``)."""
        return gaussian_mixture(np.asarray(points, dtype=np.float64), self.ritz_values, self.weights,
                                self.sigma if sigma is None else float(sigma))

    def moment(self, power: int) -> float:
        """The quadrature estimate of ``tr(A^power) / n`` (the unsmoothed ``power``-th moment)."""
        return float(np.mean(np.sum(self.weights * self.ritz_values**power, axis=1)))

    def integral(self) -> float:
        """Trapezoid integral of ``density`` over ``grid`` (close to one when the grid covers the tails)."""
        return float(np.trapezoid(self.density, self.grid)) if hasattr(np, "trapezoid") else float(
            np.trapz(self.density, self.grid)
        )

    def trace(self) -> TraceEstimate:
        """The trace implied by the density, ``n * E[sum_j w_j theta_j]``, with its standard error.

        Per probe this is ``n * q^T A q``: Hutchinson's sample for the start vector.
        """
        samples = self.size * np.sum(self.weights * self.ritz_values, axis=1)
        mean = float(samples.mean())
        se = float(samples.std(ddof=1) / math.sqrt(samples.size)) if samples.size > 1 else math.inf
        return TraceEstimate(mean, se, self.num_products, samples.size, "slq", True, samples)

    def plot(self, path: Any = None, **kwargs: Any) -> Any:
        """Draw the density, saved to ``path`` if given (needs matplotlib); returns the Figure.
        Keyword arguments as for :func:`hessian_eigenthings.spectrum.plot_spectral_density`."""
        from .plot import plot_spectral_density

        return plot_spectral_density(self, path, **kwargs)


def gaussian_mixture(points: np.ndarray, centers: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """``mean over rows p of sum_j weights[p, j] * N(points; centers[p, j], sigma^2)``, float64.

    Evaluated in chunks of points so that memory stays bounded for fine grids.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}.")
    flat_c = np.asarray(centers, dtype=np.float64).reshape(-1)
    flat_w = np.asarray(weights, dtype=np.float64).reshape(-1) / centers.shape[0]
    keep = flat_w > 0
    flat_c, flat_w = flat_c[keep], flat_w[keep]
    pts = points.reshape(-1)
    out = np.empty_like(pts)
    step = max(1, 2_000_000 // max(1, flat_c.size))
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for start in range(0, pts.size, step):
        chunk = pts[start : start + step]
        z = (chunk[:, None] - flat_c[None, :]) / sigma
        out[start : start + step] = norm * (np.exp(-0.5 * z * z) @ flat_w)
    return out.reshape(points.shape)


def _default_sigma(lo: float, hi: float) -> float:
    width = hi - lo
    if width > 0:
        return 0.0025 * width
    # every Ritz value equal (A = c I): any positive width shows the one spike
    return 1e-3 * max(abs(hi), 1.0)


def _gauss_quadrature(alphas: Tensor, betas: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the tridiagonal (alphas, betas), by a float64 tridiagonal eigensolve."""
    d = alphas.detach().to("cpu", torch.float64).numpy()
    e = betas.detach().to("cpu", torch.float64).numpy()
    if d.size == 1:
        return d.copy(), np.ones(1)
    nodes, vecs = eigh_tridiagonal(d, e)
    weights = vecs[0, :] ** 2
    return nodes, weights / weights.sum()


def default_probes_per_block(size: int, num_steps: int, num_probes: int, dtype: torch.dtype,
                             reorthogonalize: bool = True, budget_bytes: int = BLOCK_MEMORY_BYTES) -> int:
    """The most probes whose kept Lanczos vectors fit in ``budget_bytes``, between 1 and ``num_probes``.

    A probe keeps its whole basis, ``num_steps * size`` numbers of ``dtype``, when re-orthogonalising,
    and three vectors (current, previous, next) without.
    """
    per_probe = size * (num_steps if reorthogonalize else 3) * torch.empty((), dtype=dtype).element_size()
    return max(1, min(num_probes, budget_bytes // per_probe))


def _check_stochastic(op: Operator) -> None:
    if op.is_stochastic:
        raise ValueError(
            "spectral_density needs a deterministic operator, but this one uses a different mini-batch for "
            "every product, which breaks the Lanczos recurrence. Build it with full_dataset=True; for the "
            "density of one mini-batch (as PyHessian computes it), pass that single batch as the dataloader, "
            "e.g. HVPOperator(model, [(x, y)], loss)."
        )


@runs_frozen
def spectral_density(
    operator: Union[Operator, Tensor, np.ndarray],
    num_probes: int = 10,
    num_steps: int = 80,
    *,
    sigma: Optional[float] = None,
    grid: Optional[Union[np.ndarray, Tensor]] = None,
    grid_size: int = 4096,
    distribution: str = "rademacher",
    reorthogonalize: bool = True,
    probes_per_block: Optional[int] = None,
    seed: Optional[int] = 0,
    verbose: bool = True,
) -> SpectralDensity:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    The probes run in groups of g = ``probes_per_block``: the g Lanczos recurrences of a group are
    advanced together, every step one block product ``operator.apply_block`` of width g (much
    cheaper than g single products for Hessian-vector products and on a GPU). Each probe still has
    its own recurrence, basis and re-orthogonalisation (this is not block Lanczos), so every g
    gives the same density up to rounding; a probe whose recurrence breaks down leaves its block.

    Cost: at most ``num_probes * num_steps`` products (fewer when recurrences break down early),
    in ``ceil(num_probes / g) * num_steps`` block products. Memory: the Lanczos bases of a group,
    ``g * num_steps * n`` numbers (kept for full re-orthogonalisation, which keeps spurious copies
    of converged eigenvalues out of the quadrature; ``3 * g * n`` without it), plus the products'
    own.

    Args:
        operator: an :class:`Operator` (e.g. ``HVPOperator``) or a dense symmetric matrix. It must
            be deterministic: a stochastic one (a model operator with ``full_dataset=False``) is
            refused with a ValueError.
        num_probes: P, random start vectors; more probes lower the variance of the bulk.
        num_steps: m, Lanczos steps per probe (capped at n); more steps resolve finer detail.
        sigma: width of the Gaussian smoothing, in eigenvalue units. Default: 0.25% of the
            distance between the extreme Ritz values, fine enough to show outliers apart from
            the bulk as in the Hessian-spectrum papers.
        grid: the eigenvalue points to evaluate the density at; default ``grid_size`` points
            from ``min - 8 sigma`` to ``max + 8 sigma``, which holds all but ~1e-14 of the mass.
        grid_size: number of points of the default grid.
        distribution: start vectors, "rademacher" (default; then ``SpectralDensity.trace()`` is
            exactly Hutchinson's estimate with those vectors) or "gaussian".
        reorthogonalize: full re-orthogonalisation of the Lanczos basis (recommended).
        probes_per_block: g, probes advanced together (capped at ``num_probes``). None (default):
            as many as keep the group's bases within 1 GiB (:func:`default_probes_per_block`),
            at least 1. 1 runs the probes one after another with single products.
        seed: seed of the private probe generator (None: fresh randomness). The probes are drawn
            in the same order from it for every g, so a seed gives the same density for every g.
        verbose: show a progress bar (moved on every Lanczos step).

    Returns:
        A :class:`SpectralDensity` with the grid, the density, the raw Ritz values and weights;
        ``info`` holds ``num_steps`` (Lanczos steps of each probe), ``distribution`` and
        ``probes_per_block``.
    """
    op = as_operator(operator)
    num_probes = check_positive_int(num_probes, "num_probes")
    steps = check_positive_int(num_steps, "num_steps")
    grid_size = check_positive_int(grid_size, "grid_size")
    distribution = check_distribution(distribution)
    if probes_per_block is not None:
        probes_per_block = check_positive_int(probes_per_block, "probes_per_block")
    if sigma is not None and not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number or None, got {sigma!r}.")
    if grid is not None:
        grid = np.asarray(grid.detach().cpu() if isinstance(grid, Tensor) else grid, dtype=np.float64)
        if grid.ndim != 1 or grid.size < 2 or not np.all(np.diff(grid) > 0) or not np.all(np.isfinite(grid)):
            raise ValueError("grid must be a 1-D increasing array of at least two finite eigenvalue points.")
    _check_stochastic(op)
    if steps > op.size:
        logger.info("spectral_density: num_steps=%d capped at the operator size n=%d.", steps, op.size)
        steps = op.size
    if probes_per_block is None:
        group = default_probes_per_block(op.size, steps, num_probes, op.dtype, reorthogonalize)
    else:
        group = min(probes_per_block, num_probes)
    logger.info("spectral_density: %d probes in blocks of %d.", num_probes, group)

    gen = probe_generator(seed)
    first = op.num_products
    all_nodes = np.zeros((num_probes, steps))
    all_weights = np.zeros((num_probes, steps))
    used_steps = []
    with progress(total=num_probes * steps, desc="spectral density (SLQ)", verbose=verbose) as bar:
        for begin in range(0, num_probes, group):
            width = min(group, num_probes - begin)
            # Drawn per group: the stream of probes does not depend on how it is split (probes.py).
            starts = draw_probes(op, width, distribution, gen)
            # Each step moves the bar by the group's width, finished probes included, and the steps
            # that no probe of the group needed are added at the end: the bar ends at its total.
            decs = lanczos_tridiagonal_batch(op, starts, steps, reorthogonalize=reorthogonalize,
                                             keep_basis=reorthogonalize, on_step=lambda _, w=width: bar.update(w))
            del starts
            for offset, dec in enumerate(decs):
                p = begin + offset
                nodes, weights = _gauss_quadrature(dec.alphas, dec.betas)
                m = nodes.size
                all_nodes[p, :m], all_weights[p, :m] = nodes, weights
                all_nodes[p, m:] = nodes[-1]  # padding with zero weight keeps min/max meaningful
                used_steps.append(m)
            group_steps = max(dec.num_steps for dec in decs)
            del decs
            if group_steps < steps:
                bar.update(width * (steps - group_steps))

    live = all_weights > 0
    lo, hi = float(all_nodes[live].min()), float(all_nodes[live].max())
    sigma = _default_sigma(lo, hi) if sigma is None else float(sigma)
    if grid is None:
        grid = np.linspace(lo - _TAIL * sigma, hi + _TAIL * sigma, grid_size)
    spacing = float(np.max(np.diff(grid)))
    if spacing > sigma:
        logger.warning(
            "spectral_density: the grid spacing %.3g is wider than sigma=%.3g, so the peaks are "
            "under-sampled and the density will not integrate to one; raise grid_size or sigma.",
            spacing, sigma,
        )
    density = gaussian_mixture(grid, all_nodes, all_weights, sigma)
    result = SpectralDensity(
        grid, density, all_nodes, all_weights, sigma, op.size, op.num_products - first,
        info={"num_steps": np.asarray(used_steps), "distribution": distribution, "probes_per_block": group},
    )
    logger.info("spectral_density: %d probes x %d steps, Ritz values in [%.6g, %.6g].", num_probes, steps, lo, hi)
    return result
