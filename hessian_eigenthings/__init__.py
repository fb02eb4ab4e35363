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
]

# sharpness tracking during training, and diagonal preconditioning (issue 4)
from .operators.preconditioned import PreconditionedOperator, adam_preconditioner  # noqa: E402
from .tracking import SharpnessRecord, SharpnessTracker, plot_log, read_log  # noqa: E402

__all__ += [
    "PreconditionedOperator",
    "adam_preconditioner",
    "SharpnessTracker",
    "SharpnessRecord",
    "read_log",
    "plot_log",
]
