"""Automatic momentum for power iteration: a Rayleigh-Ritz step on the last two iterates.

Momentum power iteration (Xu, He, De Sa, Mitliagkas & Ré, 2018, "Accelerated stochastic power
iteration", AISTATS) runs ``x_{t+1} = B x_t - beta x_{t-1}``. Its best ``beta`` is
``lambda_2**2 / 4``, with ``lambda_2`` the second-largest eigenvalue of ``B`` in magnitude; the
steps needed then fall from about ``1 / gap`` to about ``1 / sqrt(gap)``. A ``beta`` above
``lambda_1**2 / 4`` stalls the method, so a ``beta`` guessed at run time must stay below it.

Following Austin, Pollock & Zhu (2024, "Dynamically accelerating the power iteration with
momentum", Numer. Linear Algebra Appl. 31(6), e2584), ``beta`` is updated at every step from what
the iteration already has, at no extra product. Where they read ``|lambda_2 / lambda_1|`` off the
decay of the residuals, this module takes a Rayleigh-Ritz step on the last two iterates: both
products ``A x_{t-1}`` and ``A x_t`` are known, so the projection of ``A`` on
``span{x_{t-1}, x_t}`` costs a few dot products. Two things come out of it:

* a safe ``beta``. By Cauchy's interlacing theorem (Parlett, 1998, "The Symmetric Eigenvalue
  Problem", ch. 10), the smaller Ritz value in magnitude of *any* 2-d subspace is at most the
  second-largest eigenvalue magnitude of ``B``. Less a bound on its rounding error, every estimate
  gives ``beta <= lambda_2**2 / 4``, never one that stalls; the largest estimate so far is the best
  of these bounds. As the iteration converges, the difference of the last two iterates is
  dominated by the directions that decay slowest, and the estimate rises towards ``|lambda_2|``.
  Where momentum cannot help (``lambda_2`` near 0, or nothing known yet) the estimate is near 0
  and the steps are plain power steps.
* a better eigenvector. The top Ritz vector of the window removes the residual's dominant
  direction, so it often meets the tolerance a few steps before the iterate itself. Its residual is
  estimated from small matrices at every step and measured on its vector before it is accepted.

On a stochastic operator (a new mini-batch per product) the Ritz values mix different matrices and
no bound holds; there the steps stay plain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

# Rounding of the window's products and dot products, in units of ``eps * ||A|| / ||d||`` (d is the
# part of the older iterate orthogonal to the newer one): the margin taken off every estimate.
ROUNDING_MARGIN = 100.0


def ritz_2x2(h11: float, h12: float, h22: float) -> tuple[tuple[float, float], tuple[tuple[float, float], tuple[float, float]]]:
    """Eigen-decomposition of the symmetric matrix ``[[h11, h12], [h12, h22]]``.

    Returns ``((theta_1, theta_2), (y_1, y_2))``: the eigenvalues, larger first, and unit
    eigenvectors ``y_i = (c, s)`` (the columns of a rotation).
    """
    mean = 0.5 * (h11 + h22)
    half_diff = 0.5 * (h11 - h22)
    radius = math.hypot(half_diff, h12)
    if radius == 0:
        return (mean, mean), ((1.0, 0.0), (0.0, 1.0))
    # The rotation angle from atan2 keeps full accuracy for nearly diagonal matrices.
    angle = 0.5 * math.atan2(h12, half_diff)
    c, s = math.cos(angle), math.sin(angle)
    return (mean + radius, mean - radius), ((c, s), (-s, c))


def momentum_bound(ritz: tuple[float, float], sign: float, shift: float, margin: float) -> float:
    """The largest ``beta`` that two Ritz values of ``A`` prove safe for ``B = sign * A + shift * I``.

    Args:
        ritz: the Ritz values of ``A`` on a 2-d subspace (any order).
        sign, shift: the iteration's operator is ``B = sign * A + shift * I``.
        margin: bound on the rounding error of the Ritz values (units of ``A``).

    Returns:
        ``(max(0, |mu_2| - margin))**2 / 4``, with ``|mu_2|`` the smaller magnitude of the two Ritz
        values of ``B``: at most ``lambda_2(B)**2 / 4`` by interlacing. 0 when not finite.
    """
    if not all(math.isfinite(v) for v in (*ritz, margin)):
        return 0.0
    second = min(abs(sign * ritz[0] + shift), abs(sign * ritz[1] + shift))
    bound = second - margin
    if bound <= 0:
        return 0.0
    return bound * bound / 4


@dataclass
class WindowStep:
    """One step's Rayleigh-Ritz data on ``span{x_last, x}``, still on the device.

    ``x`` and ``d`` (unit, orthogonal to ``x``) are an orthonormal basis of the window, ``ax`` and
    ``ad`` their (projected) products. ``scalars`` holds ``[||d_raw||, x^T A d, d^T A d, g00, g01,
    g11]`` where ``g`` is the Gram matrix of the basis residuals ``A [x d] - [x d] H``, from which
    the residual of any Ritz vector follows without a product.
    """

    x: Tensor
    ax: Tensor
    d: Tensor
    ad: Tensor
    scalars: Tensor


@dataclass
class RitzChoice:
    """The window's Ritz pair at the wanted end of ``B``: value of ``A``, coefficients on
    ``(x, d)``, and its residual estimated from the small matrices."""

    value: float
    coeffs: tuple[float, float]
    estimated_residual: float


class LastTwoIterates:
    """The previous iterate and its product, and the Rayleigh-Ritz step on the last two iterates.

    Holds two vectors by reference (no copy). All vector work stays on the device; the host reads
    six scalars per step (with the step's other scalars, in one read).
    """

    def __init__(self) -> None:
        self._x_last: Optional[Tensor] = None
        self._ax_last: Optional[Tensor] = None

    def remember(self, x: Tensor, ax: Tensor) -> None:
        """Keep the newest iterate (unit norm) and its product for the next step."""
        self._x_last, self._ax_last = x, ax

    def step(self, x: Tensor, ax: Tensor, residual: Tensor) -> Optional[WindowStep]:
        """Device-side Rayleigh-Ritz data of ``span{x_last, x}``; None before there are two iterates.

        Args:
            x: the newest iterate (unit norm); ``ax`` its (projected) product; ``residual`` the
                vector ``A x - (x^T A x) x``.
        """
        if self._x_last is None:
            return None
        # d is formed as a vector (never from a Gram matrix), twice orthogonalised, so its
        # direction keeps relative accuracy eps / ||d|| even when the iterates are nearly parallel.
        d, ad = self._x_last, self._ax_last
        for _ in range(2):
            overlap = torch.dot(x, d)
            d = d - overlap * x
            ad = ad - overlap * ax
        norm_d = torch.linalg.vector_norm(d)
        inverse = torch.where(norm_d > 0, 1 / norm_d, torch.zeros_like(norm_d))
        d, ad = d * inverse, ad * inverse
        h12, h22 = torch.dot(x, ad), torch.dot(d, ad)
        r0 = residual - h12 * d
        r1 = ad - h12 * x - h22 * d
        scalars = torch.stack([norm_d, h12, h22, torch.dot(r0, r0), torch.dot(r0, r1), torch.dot(r1, r1)])
        return WindowStep(x, ax, d, ad, scalars)

    @staticmethod
    def ritz_choice(host: list[float], lam: float, sign: float, shift: float) -> Optional[RitzChoice]:
        """The Ritz pair at the top of ``B = sign * A + shift * I``, from the host copy of
        :attr:`WindowStep.scalars`; None when the window is degenerate."""
        norm_d, h12, h22, g00, g01, g11 = host
        if not (norm_d > 0 and all(math.isfinite(v) for v in host)):
            return None
        values, vectors = ritz_2x2(lam, h12, h22)
        top = max((0, 1), key=lambda i: abs(sign * values[i] + shift))
        c, s = vectors[top]
        squared = c * c * g00 + 2 * c * s * g01 + s * s * g11
        return RitzChoice(values[top], (c, s), math.sqrt(max(squared, 0.0)))

    @staticmethod
    def ritz_vector(window: WindowStep, coeffs: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
        """The Ritz vector for ``coeffs`` with its Rayleigh quotient and measured residual (device):
        returns ``(lambda, v, ||A v - lambda v||)`` with v of unit norm."""
        c, s = coeffs
        v = c * window.x + s * window.d
        av = c * window.ax + s * window.ad
        norm = torch.linalg.vector_norm(v)
        v, av = v / norm, av / norm
        lam = torch.dot(v, av)
        return lam, v, torch.linalg.vector_norm(av - lam * v)


class AdaptiveMomentum:
    """The running ``beta`` for momentum power iteration on ``B = sign * A + shift * I``.

    Args:
        sign, shift: the iteration's operator is ``B = sign * A + shift * I``.
        dtype: the operator's dtype (its unit roundoff sets the rounding margin).
    """

    def __init__(self, sign: float, shift: float, dtype: torch.dtype) -> None:
        self.sign = float(sign)
        self.shift = float(shift)
        self.eps = torch.finfo(dtype).eps
        self.beta = 0.0

    def update(self, host: list[float], lam: float, scale: float) -> float:
        """Fold one window (the host copy of :attr:`WindowStep.scalars`) into ``beta``; return it.

        Args:
            host: ``[||d||, x^T A d, d^T A d, ...]`` of the step's window.
            lam: ``x^T A x`` of the newest iterate.
            scale: a size of ``A`` seen so far (e.g. the largest |eigenvalue| found); with the Ritz
                values it sets the rounding margin.
        """
        norm_d, h12, h22 = host[0], host[1], host[2]
        if not (math.isfinite(norm_d) and norm_d > 0 and math.isfinite(h12) and math.isfinite(h22)):
            return self.beta
        ritz, _ = ritz_2x2(lam, h12, h22)
        size = max(abs(ritz[0]), abs(ritz[1]), abs(scale))
        margin = ROUNDING_MARGIN * self.eps * size / norm_d
        self.beta = max(self.beta, momentum_bound(ritz, self.sign, self.shift, margin))
        return self.beta
