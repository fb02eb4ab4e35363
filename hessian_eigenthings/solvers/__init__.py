"""Eigensolvers that work on any :class:`~hessian_eigenthings.operators.Operator`."""

from .arpack import NoConvergenceError, lanczos
from .block_lanczos import block_lanczos
from .power_iter import deflated_power_iteration, power_iteration
from .result import ConvergenceWarning, EigenResult
from .thick_restart import thick_restart_lanczos

__all__ = [
    "power_iteration",
    "deflated_power_iteration",
    "lanczos",
    "EigenResult",
    "ConvergenceWarning",
    "NoConvergenceError",
    "thick_restart_lanczos",
    "block_lanczos",
]
