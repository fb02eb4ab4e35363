"""Drawing loss landscapes and per-layer tables (matplotlib is an optional extra)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from ..spectrum.plot import new_figure

if TYPE_CHECKING:
    from .landscape import Landscape1D, Landscape2D
    from .layers import LayerTable

PathLike = Optional[Union[str, os.PathLike]]

_QUANTITIES = {
    "top_eigenvalue": ("top eigenvalue", None),
    "trace": ("trace", "trace_std_error"),
    "frobenius": ("Frobenius norm", "frobenius_std_error"),
    "mean_eigenvalue": ("trace / parameters", None),
}
_CURVATURE_NAMES = {"hessian": "Hessian", "ggn": "Gauss-Newton", "fisher": "empirical Fisher"}


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is None:
        fig = new_figure(figsize)
        return fig, fig.add_subplot()
    return ax.figure, ax


def _save(fig: Any, path: PathLike, dpi: int) -> None:
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)


def plot_landscape_1d(
    landscape: "Landscape1D",
    path: PathLike = None,
    *,
    ax: Any = None,
    show_quadratic: bool = True,
    label: Optional[str] = None,
    title: Optional[str] = None,
    dpi: int = 150,
) -> Any:
    """Draw the loss along a direction, with its quadratic model as a dashed curve.

    Args:
        landscape: a :class:`Landscape1D`.
        path: if given, save the figure there.
        ax: a matplotlib Axes to draw into (e.g. to put several directions on one plot).
        show_quadratic: draw ``L0 + alpha g.d + alpha^2/2 d^T A d`` too.
        label: legend label of the loss curve (default: the direction's label).
        title: the axes title.
        dpi: resolution of the saved file.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax, (6.4, 4.2))
    name = label if label is not None else landscape.label
    line, = ax.plot(landscape.alphas, landscape.losses, marker="o", ms=3, lw=1.4, label=f"loss, {name}")
    if show_quadratic:
        fine = np.linspace(landscape.alphas.min(), landscape.alphas.max(), 200)
        kind = _CURVATURE_NAMES.get(landscape.curvature_kind, landscape.curvature_kind)
        ax.plot(fine, landscape.quadratic(fine), ls="--", lw=1.2, color=line.get_color(),
                label=f"quadratic model ({kind}: d^T A d = {landscape.curvature:.4g})")
        # the model's parabola can dwarf the loss: keep the loss curve in view
        finite = landscape.losses[np.isfinite(landscape.losses)]
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            pad = 0.08 * (high - low if high > low else max(abs(high), 1.0))
            old_low, old_high = ax.get_ylim() if len(ax.lines) > 2 else (np.inf, -np.inf)
            ax.set_ylim(min(low - pad, old_low), max(high + pad, old_high))
    ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("step alpha along the direction")
    ax.set_ylabel(f"loss ({landscape.reduction} over the dataset)")
    ax.set_title(title if title is not None else "Loss along a direction")
    ax.legend(fontsize="small")
    _save(fig, path, dpi)
    return fig


def plot_landscape_2d(
    landscape: "Landscape2D",
    path: PathLike = None,
    *,
    ax: Any = None,
    levels: int = 20,
    show_quadratic: bool = True,
    title: Optional[str] = None,
    dpi: int = 150,
) -> Any:
    """Draw the loss on a plane as filled contours, with the quadratic model's contours (dashed) at
    the same levels. The levels are spaced evenly in ``sqrt(loss - lowest loss)``, so that a
    quadratic bowl shows as evenly spaced rings.

    Args:
        landscape: a :class:`Landscape2D`.
        path: if given, save the figure there.
        ax: a matplotlib Axes to draw into.
        levels: number of contour levels.
        show_quadratic: draw the quadratic model's contours too.
        title: the axes title.
        dpi: resolution of the saved file.

    Returns:
        The matplotlib Figure.
    """
    fig, ax = _axes(ax, (6.4, 5.2))
    losses = landscape.losses
    finite = losses[np.isfinite(losses)]
    if finite.size == 0:
        raise ValueError("plot_landscape_2d: every loss on the grid is NaN or Inf; use smaller steps.")
    low, high = float(finite.min()), float(finite.max())
    span = high - low if high > low else 1.0
    marks = low + span * np.linspace(0.0, 1.0, levels + 1) ** 2
    grid_a, grid_b = np.meshgrid(landscape.alphas, landscape.betas, indexing="ij")
    filled = ax.contourf(grid_a, grid_b, np.clip(losses, low, high), levels=marks, cmap="viridis")
    fig.colorbar(filled, ax=ax, label=f"loss ({landscape.reduction} over the dataset)")
    if show_quadratic:
        # the model is a formula: draw it on a fine grid so that its rings are smooth
        fine_a = np.linspace(landscape.alphas.min(), landscape.alphas.max(), 201)
        fine_b = np.linspace(landscape.betas.min(), landscape.betas.max(), 201)
        model_a, model_b = np.meshgrid(fine_a, fine_b, indexing="ij")
        ax.contour(model_a, model_b, landscape.quadratic(fine_a, fine_b), levels=marks, colors="white",
                   linestyles="--", linewidths=0.8)
        ax.plot([], [], color="white", ls="--", lw=0.8, label="quadratic model")  # the legend's entry
    ax.plot([0.0], [0.0], marker="+", color="red", ms=10, mew=1.5, ls="none", label="current parameters")
    ax.set_xlabel(f"alpha: {landscape.labels[0]}")
    ax.set_ylabel(f"beta: {landscape.labels[1]}")
    ax.set_title(title if title is not None else "Loss on a plane (dashed: quadratic model)")
    legend = ax.legend(fontsize="small", loc="upper right")
    legend.get_frame().set_facecolor("0.85")
    _save(fig, path, dpi)
    return fig


def plot_layers(
    table: "LayerTable",
    path: PathLike = None,
    *,
    quantities: Sequence[str] = ("top_eigenvalue", "trace", "frobenius"),
    log_scale: Optional[bool] = None,
    title: Optional[str] = None,
    dpi: int = 150,
) -> Any:
    """Bar charts of a per-layer table: one panel per quantity, one bar per group and curvature,
    with 95% error bars on estimates.

    Args:
        table: a :class:`LayerTable` (from :meth:`Hessian.per_layer`).
        path: if given, save the figure there.
        quantities: which columns: "top_eigenvalue", "trace", "frobenius", "mean_eigenvalue".
        log_scale: logarithmic value axes; default (None) where every value of a panel is
            positive and they span more than a factor of 30.
        title: the figure title.
        dpi: resolution of the saved file.

    Returns:
        The matplotlib Figure.
    """
    unknown = [q for q in quantities if q not in _QUANTITIES]
    if unknown or not quantities:
        raise ValueError(f"quantities must name some of {', '.join(_QUANTITIES)}; got {list(quantities)!r}.")
    if not len(table):
        raise ValueError("plot_layers: the table is empty.")
    names, curvatures = table.names(), table.curvatures()
    side_by_side = len(names) <= 6  # few groups: one row of panels; many: panels stacked, one long axis
    if side_by_side:
        fig = new_figure((3.4 * len(quantities) + 0.6, 3.8))
        axes = fig.subplots(1, len(quantities), squeeze=False)[0]
    else:
        fig = new_figure((max(6.4, 0.45 * len(names) * len(curvatures) + 2), 2.6 * len(quantities) + 0.8))
        axes = fig.subplots(len(quantities), 1, sharex=True, squeeze=False)[:, 0]
    width = 0.8 / len(curvatures)
    x = np.arange(len(names))
    for ax, quantity in zip(axes, quantities):
        heading, error_field = _QUANTITIES[quantity]
        drawn = []
        for c, curvature in enumerate(curvatures):
            values, errors = [], []
            for name in names:
                try:
                    row = table.get(name, curvature)
                except KeyError:
                    values.append(np.nan)
                    errors.append(0.0)
                    continue
                values.append(getattr(row, quantity))
                errors.append(1.96 * getattr(row, error_field) if error_field else 0.0)
            values_array = np.asarray(values, dtype=np.float64)
            drawn.append(values_array)
            ax.bar(x + (c - (len(curvatures) - 1) / 2) * width, values_array, width,
                   yerr=np.asarray(errors) if any(e > 0 for e in errors) else None, capsize=2,
                   label=_CURVATURE_NAMES.get(curvature, curvature))
        every = np.concatenate(drawn)
        every = every[np.isfinite(every)]
        use_log = log_scale
        if use_log is None:
            use_log = bool(every.size and np.all(every > 0) and every.max() > 30 * every.min())
        if use_log:
            ax.set_yscale("log")
        if side_by_side:
            ax.set_title(heading)
        else:
            ax.set_ylabel(heading)
        ax.axhline(0.0, color="0.4", lw=0.6)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize="small")
    ticks = [f"{name}\n({table.get(name, _first_curvature(table, name)).size:,})" for name in names]
    for ax in axes if side_by_side else axes[-1:]:
        ax.set_xticks(x)
        ax.set_xticklabels(ticks, fontsize="small", rotation=0 if side_by_side or len(names) <= 12 else 60)
        ax.set_xlabel("group (parameters)")
    fig.suptitle(title if title is not None else "Curvature of each diagonal block")
    _save(fig, path, dpi)
    return fig


def _first_curvature(table: "LayerTable", name: str) -> str:
    return next(row.curvature for row in table if row.name == name)
