"""A whole analysis of a model's loss curvature on one object, per-layer summaries and loss landscapes.

* ``hessian.py``: :class:`Hessian`, one operator shared by eigenvalues, trace, diagonal, density,
  the dense matrix, the GGN / Fisher views, per-layer blocks and landscapes.
* ``groups.py``: :func:`parameter_groups`, the parameter groups whose diagonal blocks are summarised.
* ``layers.py``: :class:`LayerSummary`, :class:`LayerTable` and how a block's numbers are computed.
* ``landscape.py``: :class:`Landscape1D`, :class:`Landscape2D`, :func:`landscape_1d`,
  :func:`landscape_2d`, :func:`filter_normalized_direction`.
* ``plots.py``: :func:`plot_landscape_1d`, :func:`plot_landscape_2d`, :func:`plot_layers`.
"""

from .groups import parameter_groups
from .hessian import Hessian
from .landscape import Landscape1D, Landscape2D, filter_normalized_direction, landscape_1d, landscape_2d
from .layers import LayerSummary, LayerTable
from .plots import plot_landscape_1d, plot_landscape_2d, plot_layers

__all__ = [
    "Hessian",
    "parameter_groups",
    "LayerSummary",
    "LayerTable",
    "Landscape1D",
    "Landscape2D",
    "landscape_1d",
    "landscape_2d",
    "filter_normalized_direction",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_layers",
]
