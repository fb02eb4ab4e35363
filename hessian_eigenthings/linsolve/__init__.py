"""Linear systems with any symmetric operator, solved on the operator's device.

* :func:`cg`: conjugate gradients for positive definite systems (e.g. GGN + damping).
* :func:`minres`: MINRES for symmetric indefinite systems (e.g. a loss Hessian).

Both solve ``(A + damping I) x = b`` for one right-hand side (n,) or a block (n, m), take a warm
start and a preconditioner, and return a :class:`SolveResult`.
"""

from .cg import cg
from .minres import minres
from .problem import default_rtol
from .result import NotPositiveDefiniteError, SolveResult

__all__ = ["cg", "minres", "SolveResult", "NotPositiveDefiniteError", "default_rtol"]
