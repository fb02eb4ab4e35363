"""The loss along directions in parameter space: 1-D curves and 2-D surfaces, with the quadratic model.

For a direction ``d`` the curve is ``alpha -> L(theta + alpha d)``, the exact loss over the whole
dataset (its mean over every sample, or its sum for a summing criterion, as the model operator
defines it), next to the second-order model ``L0 + alpha g.d + alpha^2 / 2 d^T A d`` with ``g`` the
gradient and ``A`` the operator's curvature (the Hessian; the Gauss-Newton matrix or the
empirical Fisher for those operators). On a plane of two directions the surface is
``(alpha, beta) -> L(theta + alpha d1 + beta d2)`` and the model has the cross term ``d1^T A d2``.

The losses are evaluated by :meth:`~hessian_eigenthings.operators.model_operator.ModelOperator.losses_at`:
perturbed parameters enter through ``torch.func.functional_call``, so the model itself is never
written, and the mode is the operator's (eval mode by default).

Random directions are filter-normalised as in Li, Xu, Taylor, Studer and Goldstein (2018),
"Visualizing the loss landscape of neural nets": each filter (a row of a weight: one output unit
of a linear layer, one output channel of a convolution) of a Gaussian direction is rescaled to the
norm of the same filter of the parameters, so that the plot is comparable across layers and
networks whatever the scale of their weights.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.model_operator import ModelOperator
from ..utils import check_positive_int, logger, private_generator, progress

# Memory of the parameter points one pass over the data evaluates (numbers of the operator's dtype).
_POINTS_BUDGET = 2**25
BIAS_MODES = ("zero", "copy")


@dataclass
class Landscape1D:
    """The loss along one direction, and its quadratic model.

    Attributes:
        alphas: (p,) step sizes along the direction.
        losses: (p,) float64, ``L(theta + alpha d)`` for each alpha (NaN/Inf where the loss is).
        loss0: ``L(theta)``.
        slope: ``g . d``, the directional derivative at theta.
        curvature: ``d^T A d`` for the operator's curvature ``A`` (for a unit eigenvector of A:
            its eigenvalue, to the solver's tolerance).
        direction: (n,) the direction ``d``, laid out like the operator's vectors.
        label: what the direction is, e.g. "eigenvector 0 (lambda=12.3)".
        curvature_kind: "hessian", "ggn" or "fisher" (the ``A`` of the quadratic model).
        reduction: "mean" or "sum": how the loss combines the samples.
        eigenvalue: the eigenvalue, where the direction is an eigenvector; else None.
        info: extras (products and passes over the data spent).
    """

    alphas: np.ndarray
    losses: np.ndarray
    loss0: float
    slope: float
    curvature: float
    direction: Tensor
    label: str
    curvature_kind: str
    reduction: str
    eigenvalue: Optional[float] = None
    info: dict = field(default_factory=dict)

    def quadratic(self, alphas: Optional[Union[np.ndarray, Sequence[float]]] = None) -> np.ndarray:
        """``L0 + alpha g.d + alpha^2 / 2 d^T A d`` at ``alphas`` (default: :attr:`alphas`)."""
        a = self.alphas if alphas is None else np.asarray(alphas, dtype=np.float64)
        return self.loss0 + a * self.slope + 0.5 * a * a * self.curvature

    def plot(self, path: Optional[Union[str, os.PathLike]] = None, **kwargs: Any) -> Any:
        """Draw the curve and its quadratic model (needs matplotlib); see :func:`plot_landscape_1d`."""
        from .plots import plot_landscape_1d

        return plot_landscape_1d(self, path, **kwargs)


@dataclass
class Landscape2D:
    """The loss on the plane of two directions, and its quadratic model.

    Attributes:
        alphas: (p,) steps along the first direction.
        betas: (q,) steps along the second direction.
        losses: (p, q) float64: ``losses[i, j] = L(theta + alphas[i] d1 + betas[j] d2)``.
        loss0: ``L(theta)``.
        slopes: (2,) ``g . d1`` and ``g . d2``.
        curvatures: (2, 2) ``D^T A D`` for ``D = [d1, d2]`` and the operator's curvature ``A``.
        directions: (2, n) the two directions, as rows.
        labels: what each direction is.
        curvature_kind, reduction: as in :class:`Landscape1D`.
        eigenvalues: (2,) the eigenvalues where both directions are eigenvectors; else None.
        info: extras (products and passes over the data spent).
    """

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    loss0: float
    slopes: np.ndarray
    curvatures: np.ndarray
    directions: Tensor
    labels: tuple
    curvature_kind: str
    reduction: str
    eigenvalues: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)

    def quadratic(
        self, alphas: Optional[Union[np.ndarray, Sequence[float]]] = None,
        betas: Optional[Union[np.ndarray, Sequence[float]]] = None,
    ) -> np.ndarray:
        """The quadratic model on the grid ``alphas x betas`` (default: the landscape's), shape (p, q)."""
        a = self.alphas if alphas is None else np.asarray(alphas, dtype=np.float64)
        b = self.betas if betas is None else np.asarray(betas, dtype=np.float64)
        aa, bb = np.meshgrid(a, b, indexing="ij")
        c = self.curvatures
        return (self.loss0 + aa * self.slopes[0] + bb * self.slopes[1]
                + 0.5 * (c[0, 0] * aa * aa + 2 * c[0, 1] * aa * bb + c[1, 1] * bb * bb))

    def plot(self, path: Optional[Union[str, os.PathLike]] = None, **kwargs: Any) -> Any:
        """Draw the surface as contours with the quadratic model's (needs matplotlib); see
        :func:`plot_landscape_2d`."""
        from .plots import plot_landscape_2d

        return plot_landscape_2d(self, path, **kwargs)


def filter_normalized_direction(
    operator: ModelOperator, *, seed: Optional[int] = 0, biases: str = "zero"
) -> Tensor:
    """A random direction with every filter rescaled to the norm of the parameters' filter
    (Li, Xu, Taylor, Studer and Goldstein, 2018, "Visualizing the loss landscape of neural nets").

    Each parameter with two or more dimensions gets a standard normal direction whose rows
    (``d[i]``: one output unit's or channel's weights) are rescaled to ``||theta[i]||``. Parameters
    with at most one dimension (biases, normalisation scales) are not filters.

    Args:
        operator: a model operator; the direction covers its chosen parameters.
        seed: seed of a private generator (the global random state is not touched); None: fresh.
        biases: "zero" (default: one-dimensional parameters are not moved, as in the paper's
            plots) or "copy" (their direction is the parameter itself).

    Returns:
        (n,) tensor in the operator's dtype and on its device, laid out like its vectors.
    """
    if biases not in BIAS_MODES:
        raise ValueError(f"biases={biases!r} is not known; use 'zero' (leave them in place) or 'copy'.")
    gen = private_generator(seed)
    theta = operator.parameters_vector()
    pieces = []
    for value in operator.unflatten(theta).values():
        if value.dim() <= 1:
            pieces.append(torch.zeros_like(value) if biases == "zero" else value.clone())
            continue
        d = torch.randn(value.shape, generator=gen, dtype=torch.float64).to(value.device)
        rows = d.reshape(d.shape[0], -1)
        target = value.detach().reshape(value.shape[0], -1).double().norm(dim=1, keepdim=True)
        rows = rows / rows.norm(dim=1, keepdim=True) * target
        pieces.append(rows.reshape(value.shape).to(value.dtype))
    return torch.cat([p.reshape(-1) for p in pieces])


#: The default radius of a direction that is not random puts the ends of the grid where the quadratic
#: model's curvature term, alpha^2 / 2 d^T A d, is this many times the loss.
RISE = 4.0


def check_grid(radius: Optional[float], steps: int) -> int:
    """``steps`` as an int of at least 2, after checking that ``radius`` is None or a positive number;
    a ValueError/TypeError saying what to pass otherwise."""
    if radius is not None and (isinstance(radius, bool) or not (
            isinstance(radius, (int, float)) and math.isfinite(radius) and radius > 0)):
        raise ValueError(f"radius must be a positive number, got {radius!r}.")
    steps = check_positive_int(steps, "steps")
    if steps < 2:
        # One point of linspace(-r, r, 1) is -r alone: not the current parameters, not a curve.
        raise ValueError(f"steps must be at least 2 (the grid runs from -radius to radius), got {steps}; pass "
                         f"alphas= for points of your own.")
    return steps


def default_steps(radius: Optional[float], steps: int, loss0: float, curvature: float, random: bool) -> np.ndarray:
    """``steps`` points evenly in ``[-radius, radius]``. Default radius: 1 for a filter-normalised random
    direction (the scale of the parameters themselves); otherwise where ``alpha^2 / 2 |d^T A d|``
    reaches ``RISE`` times ``|L0|`` (1 where the curvature or the loss is zero)."""
    steps = check_grid(radius, steps)
    if radius is None:
        scale = abs(loss0) if loss0 != 0 else 1.0
        radius = 1.0 if random or curvature == 0 or not math.isfinite(curvature) else math.sqrt(
            2 * RISE * scale / abs(curvature))
    return np.linspace(-radius, radius, steps)


def check_steps(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array of finite numbers, or a ValueError naming ``name``."""
    array = np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a 1-D sequence of finite step sizes, got shape {array.shape}.")
    return array


def check_directions(directions: Any, operator: ModelOperator, count: int) -> Tensor:
    """``directions`` as a (count, n) tensor in the operator's dtype and on its device."""
    if isinstance(directions, np.ndarray):
        directions = torch.from_numpy(directions)
    if not isinstance(directions, Tensor):
        raise TypeError(f"a direction must be a torch.Tensor or numpy array of shape (n,), got "
                        f"{type(directions).__name__}.")
    rows = directions.reshape(1, -1) if directions.dim() == 1 else directions
    if rows.dim() != 2 or rows.shape != (count, operator.size):
        raise ValueError(
            f"expected {count} direction(s) of length n={operator.size} (the analysed parameters, laid out like "
            f"the operator's vectors), got shape {tuple(directions.shape)}."
        )
    rows = rows.detach().to(device=operator.device, dtype=operator.dtype)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("a direction contains NaN or Inf entries.")
    if bool((torch.linalg.vector_norm(rows, dim=1) == 0).any()):
        raise ValueError("a direction is the zero vector; the loss does not change along it.")
    return rows


def _quadratic_terms(operator: ModelOperator, rows: Tensor) -> tuple[float, np.ndarray, np.ndarray, Tensor]:
    """(L0, slopes D g, curvatures D A D^T, theta) at the current parameters, for directions as rows."""
    loss0, grad = operator.loss_and_gradient()
    theta = operator.parameters_vector()
    slopes = (rows.double() @ grad.double()).cpu().numpy()
    curved = operator.apply_block(rows.T.contiguous())
    curvatures = (rows.double() @ curved.double()).cpu().numpy()
    return loss0, slopes, (curvatures + curvatures.T) / 2, theta


def losses_on_grid(operator: ModelOperator, theta: Tensor, rows: Tensor, coefficients: np.ndarray,
                   verbose: bool) -> np.ndarray:
    """``L(theta + c @ rows)`` for each row ``c`` of ``coefficients`` (P, m), in passes over the data
    of as many points as fit a fixed memory budget; returns (P,) float64."""
    total = coefficients.shape[0]
    per_pass = max(1, min(total, _POINTS_BUDGET // max(1, operator.size)))
    out = np.empty(total, dtype=np.float64)
    with progress(total=total, desc="loss landscape", verbose=verbose) as bar:
        for start in range(0, total, per_pass):
            stop = min(total, start + per_pass)
            c = torch.as_tensor(coefficients[start:stop], dtype=torch.float64, device=operator.device)
            points = theta.unsqueeze(1) + (rows.T.double() @ c.T).to(operator.dtype)
            out[start:stop] = operator.losses_at(points).cpu().numpy()
            bar.update(stop - start)
    return out


def landscape_1d(
    operator: ModelOperator, direction: Any, alphas: Any = None, *, radius: Optional[float] = None,
    steps: int = 21, random: bool = False, label: str = "direction", curvature_kind: str = "hessian",
    eigenvalue: Optional[float] = None, verbose: bool = True,
) -> Landscape1D:
    """The loss along ``direction`` at the steps ``alphas``, with its quadratic model.

    Costs one gradient (a forward and backward pass over the data), one product with the
    operator, and ``len(alphas)`` forward passes over the data without gradients.

    Args:
        operator: a model operator (its loss, data, mode and curvature are used).
        direction: (n,) tensor or array, laid out like the operator's vectors.
        alphas: 1-D step sizes (0 is the current parameters); default ``steps`` points in
            ``[-radius, radius]`` (see :func:`default_steps`).
        radius, steps: the default grid.
        random: the direction is a filter-normalised random one (its default radius is 1).
        label: what the direction is, for the plot.
        curvature_kind: the name of the operator's curvature, for the plot.
        eigenvalue: the eigenvalue, where ``direction`` is an eigenvector.
        verbose: progress bar over the points.
    """
    if alphas is None:
        check_grid(radius, steps)
    else:
        alphas = check_steps(alphas, "alphas")
    rows = check_directions(direction, operator, 1)
    first = operator.num_products
    loss0, slopes, curvatures, theta = _quadratic_terms(operator, rows)
    if alphas is None:
        alphas = default_steps(radius, steps, loss0, float(curvatures[0, 0]), random)
    losses = losses_on_grid(operator, theta, rows, alphas[:, None], verbose)
    logger.info("landscape_1d: %d points along %s; L0 = %.6g, slope %.4g, curvature %.6g.", alphas.size, label,
                loss0, slopes[0], curvatures[0, 0])
    return Landscape1D(alphas, losses, loss0, float(slopes[0]), float(curvatures[0, 0]), rows[0], label,
                       curvature_kind, operator.reduction or "mean", eigenvalue,
                       info={"num_products": operator.num_products - first, "points": int(alphas.size)})


def landscape_2d(
    operator: ModelOperator, directions: Any, alphas: Any = None, betas: Any = None, *,
    radius: Optional[float] = None, steps: int = 21, random: Sequence[bool] = (False, False),
    labels: Sequence[str] = ("d1", "d2"), curvature_kind: str = "hessian",
    eigenvalues: Optional[Sequence[float]] = None, verbose: bool = True,
) -> Landscape2D:
    """The loss on the grid ``theta + alphas[i] d1 + betas[j] d2``, with its quadratic model.

    Costs one gradient, two products with the operator and ``len(alphas) * len(betas)`` forward
    passes over the data without gradients.

    Args:
        operator: a model operator (its loss, data, mode and curvature are used).
        directions: (2, n) tensor or array: the two directions as rows.
        alphas, betas: 1-D steps along the first and the second direction; each defaults to
            ``steps`` points in its own ``[-radius, radius]`` (see :func:`default_steps`).
        radius, steps: the default grids.
        random: which directions are filter-normalised random ones (default radius 1).
        labels: what each direction is, for the plot.
        curvature_kind: the name of the operator's curvature, for the plot.
        eigenvalues: the two eigenvalues, where both directions are eigenvectors.
        verbose: progress bar over the points.
    """
    alphas = None if alphas is None else check_steps(alphas, "alphas")
    betas = None if betas is None else check_steps(betas, "betas")
    if alphas is None or betas is None:
        check_grid(radius, steps)
    rows = check_directions(directions, operator, 2)
    first = operator.num_products
    loss0, slopes, curvatures, theta = _quadratic_terms(operator, rows)
    if alphas is None:
        alphas = default_steps(radius, steps, loss0, float(curvatures[0, 0]), random[0])
    if betas is None:
        betas = default_steps(radius, steps, loss0, float(curvatures[1, 1]), random[1])
    aa, bb = np.meshgrid(alphas, betas, indexing="ij")
    coefficients = np.stack([aa.reshape(-1), bb.reshape(-1)], axis=1)
    losses = losses_on_grid(operator, theta, rows, coefficients, verbose).reshape(alphas.size, betas.size)
    logger.info("landscape_2d: %d x %d points; L0 = %.6g.", alphas.size, betas.size, loss0)
    return Landscape2D(alphas, betas, losses, loss0, slopes, curvatures, rows, tuple(labels), curvature_kind,
                       operator.reduction or "mean", None if eigenvalues is None else np.asarray(eigenvalues, float),
                       info={"num_products": operator.num_products - first, "points": int(coefficients.shape[0])})
