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
from .solvers import SolverMemory, solver_memory

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
    "solver_memory",
    "SolverMemory",
]

# Spectrum analysis (trace, diagonal, density, dense Hessians) and the GGN / empirical Fisher operators.
from .operators.ggn import EmpiricalFisherOperator, GGNOperator  # noqa: E402
from .spectrum import (  # noqa: E402
    DiagonalEstimate,
    SpectralDensity,
    TraceEstimate,
    dense_eigenthings,
    dense_matrix,
    exact_diagonal,
    hessian_density,
    hessian_diagonal,
    hessian_trace,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    loss_hessian,
    output_hessian,
    plot_spectral_density,
    spectral_density,
)

__all__ += [
    "GGNOperator",
    "EmpiricalFisherOperator",
    "hutchinson_trace",
    "hutchpp_trace",
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
    "dense_eigenthings",
    "hessian_trace",
    "hessian_density",
    "hessian_diagonal",
]

# sharpness tracking during training, and diagonal preconditioning
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

# the tracking log's errors: a record that could not be written, a log file another writer holds
from .tracking import TrackingLogInUseError, TrackingLogWriteError  # noqa: E402

__all__ += ["TrackingLogWriteError", "TrackingLogInUseError"]

# CPU thread oversubscription check (warns once when torch's threads exceed the usable cores)
from .threads import ThreadOversubscriptionWarning, check_cpu_threads  # noqa: E402

__all__ += ["ThreadOversubscriptionWarning", "check_cpu_threads"]

# exchangeable estimators, squared Frobenius norms, and operator algebra
from .operators.algebra import LinearCombination, ProjectedOperator, SubmatrixOperator, deflate, submatrix  # noqa: E402
from .spectrum import (  # noqa: E402
    FrobeniusEstimate,
    estimate_diagonal,
    estimate_frobenius,
    estimate_trace,
    hutchinson_frobenius,
    hutchpp_frobenius,
    xdiag,
    xtrace,
    xtrace_frobenius,
)

__all__ += [
    "xtrace",
    "xdiag",
    "estimate_trace",
    "estimate_diagonal",
    "FrobeniusEstimate",
    "hutchinson_frobenius",
    "hutchpp_frobenius",
    "xtrace_frobenius",
    "estimate_frobenius",
    "LinearCombination",
    "ProjectedOperator",
    "SubmatrixOperator",
    "deflate",
    "submatrix",
]

# linear systems with any symmetric operator: conjugate gradients and MINRES
from .linsolve import NotPositiveDefiniteError, SolveResult, cg, minres  # noqa: E402

__all__ += ["cg", "minres", "SolveResult", "NotPositiveDefiniteError"]

# diagonals backpropagated at about a gradient's cost: HesScale and the GGN diagonal
from .spectrum import ggn_diagonal, hesscale_diagonal  # noqa: E402

__all__ += ["hesscale_diagonal", "ggn_diagonal"]

# the positive-curvature Hessian of Hessian backpropagation (block diagonal, positive semi-definite)
from .operators.pch import PCHOperator  # noqa: E402

__all__ += ["PCHOperator"]

# one object for a whole analysis, per-layer summaries and loss landscapes
from .analysis import (  # noqa: E402
    Hessian,
    Landscape1D,
    Landscape2D,
    LayerSummary,
    LayerTable,
    filter_normalized_direction,
    parameter_groups,
    plot_landscape_1d,
    plot_landscape_2d,
    plot_layers,
)

__all__ += [
    "Hessian",
    "LayerSummary",
    "LayerTable",
    "Landscape1D",
    "Landscape2D",
    "parameter_groups",
    "filter_normalized_direction",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_layers",
]
