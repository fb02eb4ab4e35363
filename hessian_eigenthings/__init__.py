"""hessian_eigenthings: eigenpairs of loss Hessians and other large symmetric operators, matrix-free."""

from .eigenthings import compute_hessian_eigenthings
from .model_utils import select_parameters
from .operators import HVPOperator, LambdaOperator, MatrixOperator, NonFiniteError, Operator, as_operator
from .solvers import (
    ConvergenceWarning,
    EigenResult,
    NoConvergenceError,
    deflated_power_iteration,
    lanczos,
    power_iteration,
)
from .solvers import block_lanczos, thick_restart_lanczos

__version__ = "1.0.0"

__all__ = [
    "compute_hessian_eigenthings",
    "Operator",
    "LambdaOperator",
    "MatrixOperator",
    "HVPOperator",
    "as_operator",
    "select_parameters",
    "power_iteration",
    "deflated_power_iteration",
    "lanczos",
    "EigenResult",
    "ConvergenceWarning",
    "NoConvergenceError",
    "NonFiniteError",
    "thick_restart_lanczos",
    "block_lanczos",
]
