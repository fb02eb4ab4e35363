"""Drawing a tracking log: eigenvalues against steps, the loss on a second axis.

matplotlib is imported only when a plot is drawn (``pip install "hessian_eigenthings[plot]"``), by
:func:`hessian_eigenthings.spectrum.plot.new_figure`, which builds a ``matplotlib.figure.Figure``
rather than a pyplot figure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..spectrum.plot import new_figure
from .log import PathLike, SharpnessRecord, read_log


def plot_log(
    log: Union[PathLike, Sequence[SharpnessRecord]],
    out: Optional[PathLike] = None,
    *,
    ax: Any = None,
    threshold: Optional[float] = None,
    threshold_label: Optional[str] = None,
    show_loss: bool = True,
    loss_log_scale: bool = True,
    title: Optional[str] = None,
) -> Any:
    """Plot a tracking log: one line per tracked eigenvalue against the step, the loss on a right axis.

    Args:
        log: a log file (.jsonl or .csv) or a list of :class:`SharpnessRecord` (``tracker.records``).
        out: save the figure here (the format follows the suffix, e.g. .png, .pdf).
        ax: draw on this matplotlib Axes instead of a new figure.
        threshold: draw a horizontal line at this eigenvalue, e.g. ``2 / lr``, the stability limit of
            gradient descent with learning rate lr.
        threshold_label: the line's legend label (default ``"threshold = <value>"``).
        show_loss: draw the records' "loss" extra on a second y axis when they have one.
        loss_log_scale: log scale for the loss axis.
        title: the axes' title.

    Returns:
        The matplotlib Figure.
    """
    records = read_log(log) if isinstance(log, (str, Path)) or hasattr(log, "__fspath__") else list(log)
    if not records:
        raise ValueError("The log has no records to plot.")
    own_figure = ax is None
    if own_figure:
        fig = new_figure((7.0, 4.2))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    steps = [r.step for r in records]
    k = max(len(r.eigenvalues) for r in records)
    prefix = "preconditioned " if records[0].preconditioned else ""
    symbol = {"LA": "largest", "SA": "smallest", "LM": "largest |.|"}.get(records[0].which, "")
    handles = []
    for i in range(k):
        values = [r.eigenvalues[i] if i < len(r.eigenvalues) else float("nan") for r in records]
        (line,) = ax.plot(steps, values, lw=1.6 if i == 0 else 1.0, label=f"$\\lambda_{{{i + 1}}}$")
        handles.append(line)
    if threshold is not None:
        handles.append(ax.axhline(threshold, color="black", ls="--", lw=1.0,
                                  label=threshold_label or f"threshold = {threshold:.4g}"))
    ax.set_xlabel("step")
    ax.set_ylabel(f"{prefix}Hessian eigenvalue ({symbol})" if symbol else f"{prefix}Hessian eigenvalue")
    losses = [r.extras.get("loss") for r in records]
    if show_loss and any(isinstance(v, (int, float)) for v in losses):
        right = ax.twinx()
        pts = [(s, v) for s, v in zip(steps, losses) if isinstance(v, (int, float))]
        (line,) = right.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:gray", ls=":", lw=1.2, label="loss")
        right.set_ylabel("loss")
        if loss_log_scale and all(p[1] > 0 for p in pts):
            right.set_yscale("log")
        handles.append(line)
    if own_figure:
        # Above the axes in one row (the title goes above it): inside, "best" would avoid the eigenvalue
        # lines but not the loss, which lives on the twin axis.
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles),
                  frameon=False, fontsize="small")
        if title:
            fig.suptitle(title)
    else:
        ax.legend(handles=handles, loc="best", fontsize="small")
        if title:
            ax.set_title(title)
    if out is not None:
        fig.savefig(out, dpi=150)
    return fig
