"""Drawing a spectral density (matplotlib is an optional extra: ``pip install hessian_eigenthings[plot]``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

if TYPE_CHECKING:
    from .density import SpectralDensity


def new_figure(figsize: tuple[float, float]) -> Any:
    """A new ``matplotlib.figure.Figure`` (not a pyplot figure: saving works without a display and
    pyplot's list of open figures is left alone, so plotting in a loop leaks nothing).

    Raises an ImportError that says how to install matplotlib when it is missing.
    """
    try:
        import matplotlib  # noqa: F401  (fails first when matplotlib is missing, even if a submodule is cached)
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Plotting needs matplotlib, an optional extra of hessian_eigenthings. Install it with "
            "pip install 'hessian_eigenthings[plot]' (or pip install matplotlib)."
        ) from None
    return Figure(figsize=figsize, layout="constrained")


def plot_spectral_density(
    density: "SpectralDensity",
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    ax: Any = None,
    log_scale: bool = True,
    floor: float = 1e-7,
    title: Optional[str] = None,
    label: Optional[str] = None,
    show_extremes: bool = True,
    dpi: int = 150,
) -> Any:
    """Draw a :class:`SpectralDensity` as a curve, by default on a log density axis.

    The log axis is what the Hessian-spectrum papers use: the bulk near zero and the few large
    outliers differ by orders of magnitude in density and only show together on a log scale.

    Args:
        density: the result of :func:`spectral_density`.
        path: if given, save the figure there (the format follows the suffix, e.g. ``.png``).
        ax: a matplotlib Axes to draw into; default a new figure.
        log_scale: logarithmic density axis (default True).
        floor: on the log axis, densities below ``floor * max(density)`` are cut off (the
            Gaussian tails would otherwise stretch the axis over hundreds of decades).
        title: the axes title; default names the probes and steps.
        label: legend label of the curve.
        show_extremes: mark the smallest and largest Ritz values with dotted lines.
        dpi: resolution of the saved file.

    Returns:
        The matplotlib Figure.
    """
    if ax is None:
        fig = new_figure((6.4, 4.0))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    values = np.asarray(density.density, dtype=np.float64)
    if log_scale:
        drawn_before = bool(ax.lines)
        old_low, old_high = ax.get_ylim()
        top = float(values.max()) if values.size else 1.0
        cut = floor * top if top > 0 else floor
        ax.semilogy(density.grid, np.maximum(values, cut), label=label, lw=1.2)
        low, high = cut, top * 2 if top > 0 else 1.0
        if drawn_before:  # a second curve on the same axes: keep the first one in view
            low, high = min(low, old_low), max(high, old_high)
        ax.set_ylim(low, high)
    else:
        ax.plot(density.grid, values, label=label, lw=1.2)
    if show_extremes:
        lo, hi = density.extremes
        for x in (lo, hi):
            ax.axvline(x, color="0.5", ls=":", lw=0.8)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)" if log_scale else "density")
    steps = int(np.max(density.info.get("num_steps", [density.ritz_values.shape[1]])))
    ax.set_title(title if title is not None else
                 f"Spectral density (SLQ: {density.num_probes} probes x {steps} steps, sigma={density.sigma:.2g})")
    if label is not None:
        ax.legend()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig
