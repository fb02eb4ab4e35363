"""Eigensolvers that work on any :class:`~hessian_eigenthings.operators.Operator`.

Each solver file holds one algorithm; :mod:`.contract` checks every solver's arguments and builds
every result, :mod:`.product_view` counts, checks and scales every product, :mod:`.memory` says what
a solve costs, and :mod:`.registry` names the solvers for ``compute_hessian_eigenthings``.
"""

from .arpack import NoConvergenceError, lanczos
from .block_lanczos import block_lanczos
from .memory import SolverMemory, solver_memory
from .power_iter import deflated_power_iteration, power_iteration
from .registry import RegisteredSolver, get_solver, register_solver, solver_names
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
    "solver_memory",
    "SolverMemory",
    "get_solver",
    "register_solver",
    "solver_names",
    "RegisteredSolver",
]
