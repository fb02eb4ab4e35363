"""Spectrum analysis beyond the top eigenpairs: trace, diagonal, spectral density, dense Hessians.

Every estimator works on any :class:`~hessian_eigenthings.operators.Operator` (the loss Hessian,
the GGN, the empirical Fisher, a parameter block of any of them, a user's own operator); the
``hessian_*`` functions are one-call wrappers for a model's loss over a dataloader.

* ``montecarlo.py``: the Monte-Carlo loop the probe-based estimators share.
* ``trace.py``: :func:`hutchinson_trace`, :func:`hutchpp_trace` (estimate and standard error).
* ``exchangeable.py``: :func:`xtrace`, :func:`xdiag` (exchangeable estimators, with error estimates).
* ``frobenius.py``: :func:`hutchinson_frobenius`, :func:`hutchpp_frobenius`, :func:`xtrace_frobenius`.
* ``diagonal.py``: :func:`hutchinson_diagonal`, :func:`exact_diagonal`.
* ``estimates.py``: the result types.
* ``density.py``: :func:`spectral_density` (stochastic Lanczos quadrature).
* ``plot.py``: :func:`plot_spectral_density` (matplotlib, an optional extra).
* ``dense.py``: :func:`dense_matrix`, :func:`loss_hessian`, :func:`output_hessian`,
  :func:`dense_eigenthings`.
* ``api.py``: :func:`hessian_trace`, :func:`hessian_density`, :func:`hessian_diagonal`.
* ``hesscale.py``: :func:`hesscale_diagonal` (HesScale, backpropagated layer by layer).
* ``ggn_diagonal.py``: :func:`ggn_diagonal` (exact and Monte-Carlo GGN diagonals by backpropagation).
"""

from .api import CURVATURES, curvature_operator, hessian_density, hessian_diagonal, hessian_trace
from .dense import dense_eigenthings, dense_matrix, loss_hessian, output_hessian, split_by_parameter
from .density import SpectralDensity, spectral_density
from .diagonal import DiagonalEstimate, exact_diagonal, hutchinson_diagonal
from .plot import plot_spectral_density
from .trace import TraceEstimate, estimate_trace, hutchinson_trace, hutchpp_trace
from .diagonal import DIAGONAL_METHODS, estimate_diagonal
from .frobenius import (
    FrobeniusEstimate,
    estimate_frobenius,
    hutchinson_frobenius,
    hutchpp_frobenius,
    xtrace_frobenius,
)
from .trace import TRACE_METHODS
from .exchangeable import xdiag, xtrace
from .ggn_diagonal import ggn_diagonal
from .hesscale import hesscale_diagonal

__all__ = [
    "hutchinson_trace",
    "hutchpp_trace",
    "estimate_trace",
    "TraceEstimate",
    "hutchinson_diagonal",
    "exact_diagonal",
    "DiagonalEstimate",
    "spectral_density",
    "SpectralDensity",
    "plot_spectral_density",
    "dense_matrix",
    "loss_hessian",
    "output_hessian",
    "split_by_parameter",
    "dense_eigenthings",
    "hessian_trace",
    "hessian_density",
    "hessian_diagonal",
    "curvature_operator",
    "CURVATURES",
    "xtrace",
    "xdiag",
    "estimate_diagonal",
    "DIAGONAL_METHODS",
    "TRACE_METHODS",
    "FrobeniusEstimate",
    "hutchinson_frobenius",
    "hutchpp_frobenius",
    "xtrace_frobenius",
    "estimate_frobenius",
    "hesscale_diagonal",
    "ggn_diagonal",
]
