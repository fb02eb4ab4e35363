"""What the linear solvers return, and the error raised when CG meets a direction of non-positive
curvature."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor


class NotPositiveDefiniteError(ValueError):
    """Conjugate gradients found a direction ``p`` with ``p^T (A + damping I) p <= 0``: the operator
    is not positive definite, so CG's answer would be meaningless.

    Attributes:
        column: the right-hand side (column of ``b``) whose iteration met it.
        iteration: the iteration at which it was met (1-based).
        curvature: ``p^T (A + damping I) p / ||p||^2``, a Rayleigh quotient: the most negative
            eigenvalue of ``A + damping I`` is at most this.
        direction: the direction ``p`` (n,), on the operator's device.
    """

    def __init__(self, message: str, column: int, iteration: int, curvature: float, direction: Tensor) -> None:
        super().__init__(message)
        self.column = column
        self.iteration = iteration
        self.curvature = curvature
        self.direction = direction


@dataclass
class SolveResult:
    """A solution of ``(A + damping I) x = b`` and how it was found.

    Attributes:
        x: the solution, shaped like ``b``: (n,) or (n, m), on the operator's device and dtype.
        converged: True when every column met ``||b - (A + damping I) x|| <= max(rtol ||b||, atol)``,
            checked on the true residual (one product per column at its end), never on the
            recurrence's estimate alone.
        iterations: iterations of the column that took the most.
        residual_norms: the residual norm after each iteration, as the recurrence tracks it:
            (iterations + 1,) for a vector ``b``, (iterations + 1, m) for a block; row 0 is the
            starting residual; NaN once a column has left the block. The true final residuals are
            in :attr:`final_residual_norms`.
        num_products: operator products used, warm-start and final checks included (a block of b
            vectors counts b).
        info: details: "method", "damping", "rtol", "atol", "max_iters", "column_converged" (m,)
            bools, "column_iterations" (m,) ints, "final_residual_norms" (m,) true residual norms,
            "rhs_norms" (m,) ``||b_j||``, "restarts" (m,) residual replacements, and the columns
            that stopped for a reason other than convergence: "not_positive_definite" (CG with
            ``on_indefinite="return"``), "singular" (MINRES: the residual stopped falling at a
            least-squares solution: the operator is singular, or nearly so, and ``b`` is not in its
            range), and "checks" (host looks at the residuals).
    """

    x: Tensor
    converged: bool
    iterations: int
    residual_norms: np.ndarray
    num_products: int
    info: dict = field(default_factory=dict)

    @property
    def final_residual_norms(self) -> np.ndarray:
        """(m,) true residual norms ``||b_j - (A + damping I) x_j||`` of the returned solution."""
        return self.info["final_residual_norms"]

    @property
    def relative_residuals(self) -> np.ndarray:
        """(m,) ``||b_j - (A + damping I) x_j|| / ||b_j||`` (0 for a zero right-hand side)."""
        norms = self.info["rhs_norms"]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(norms > 0, self.final_residual_norms / np.where(norms > 0, norms, 1.0), 0.0)
