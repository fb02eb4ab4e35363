"""Conjugate gradients for symmetric positive definite systems ``(A + damping I) x = b``.

Hestenes & Stiefel (1952), "Methods of conjugate gradients for solving linear systems", with a
preconditioner ``M`` (the iteration of CG on ``M^{-1/2} A M^{-1/2}``, written with ``M^{-1}``
only). Every right-hand side runs its own recurrence; the block of them shares one operator
product per iteration (see :mod:`.driver`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..operators.base import runs_frozen
from .driver import BlockSolve, State
from .problem import LinearProblem, Preconditioner, check_problem
from .result import NotPositiveDefiniteError, SolveResult

ON_INDEFINITE = ("raise", "return")


class ConjugateGradients:
    """The CG recurrence for a block of independent columns (see :class:`.driver.Recurrence`)."""

    name = "cg"

    def __init__(self, on_indefinite: str, damping: float) -> None:
        self.on_indefinite = on_indefinite
        self.damping = damping
        self.negative_curvature: dict[int, dict] = {}

    def start(self, problem: LinearProblem, x: Tensor, r: Tensor) -> State:
        z = r if problem.precondition is None else problem.precondition(r)
        rz = (r * z).sum(dim=0)
        if problem.precondition is not None and bool((rz <= 0).any()):  # a start is on the host anyway
            raise _preconditioner_error()
        return {"x": x, "r": r, "p": z.clone(), "rz": rz}

    def step(self, problem: LinearProblem, state: State) -> tuple[State, Tensor, Tensor, Tensor, State]:
        x, r, p, rz = state["x"], state["r"], state["p"], state["rz"]
        ap = problem.apply(p)
        curvature = (p * ap).sum(dim=0)
        alpha = rz / curvature
        x = x + alpha * p
        r = r - alpha * ap
        z = r if problem.precondition is None else problem.precondition(r)
        rz_next = (r * z).sum(dim=0)
        p = z + (rz_next / rz) * p
        # p^T A p <= 0: A is not positive definite along p, and this step would be meaningless.
        # r^T M^-1 r < 0: the preconditioner is not positive definite.
        reject = (curvature <= 0) | (rz_next < 0)
        extras = {"curvature": curvature, "p_norm2": (state["p"] ** 2).sum(dim=0), "rz": rz_next}
        new = {"x": x, "r": r, "p": p, "rz": rz_next}
        return new, torch.linalg.vector_norm(r, dim=0), reject, torch.zeros_like(reject), extras

    def rejection(self, state: State, extras: State, local: int, column: int, iteration: int) -> Optional[Exception]:
        if float(extras["rz"][local]) < 0 and float(extras["curvature"][local]) > 0:
            return _preconditioner_error()
        rayleigh = float(extras["curvature"][local]) / max(float(extras["p_norm2"][local]), 1e-300)
        direction = state["p"][:, local].clone()
        self.negative_curvature[column] = {"iteration": iteration, "curvature": rayleigh, "direction": direction}
        if self.on_indefinite == "return":
            return None
        return NotPositiveDefiniteError(
            f"cg: the operator is not positive definite. At iteration {iteration} (right-hand side {column}) CG "
            f"found a direction p with p^T (A + damping I) p / ||p||^2 = {rayleigh:.4g} <= 0, so the smallest "
            f"eigenvalue of A + damping I is at most that, and CG's answer would be meaningless. For a symmetric "
            f"indefinite operator such as a loss Hessian use minres(); or make the system positive definite with "
            f"damping well above {self.damping - rayleigh:.4g} (now {self.damping:.4g}), or use a positive "
            f"semi-definite curvature such as the GGN with damping > 0. on_indefinite='return' returns the "
            f"iterate reached so far and this direction (info['negative_curvature']) instead of raising.",
            column, iteration, rayleigh, direction,
        )


def _preconditioner_error() -> ValueError:
    return ValueError(
        "cg: the preconditioner is not positive definite (r^T M^-1 r <= 0 for a residual r != 0). A diagonal "
        "preconditioner must be positive (e.g. d.abs() + damping); a callable must apply the inverse of a positive "
        "definite M."
    )


@runs_frozen
def cg(
    operator: Any,
    b: Any,
    *,
    damping: float = 0.0,
    x0: Optional[Any] = None,
    rtol: Optional[float] = None,
    atol: float = 0.0,
    max_iters: Optional[int] = None,
    preconditioner: Preconditioner = None,
    on_indefinite: str = "raise",
    check_every: Optional[int] = None,
    verbose: bool = True,
) -> SolveResult:
    """Solve ``(A + damping I) x = b`` for a symmetric positive definite ``A + damping I`` by
    (preconditioned) conjugate gradients.

    Args:
        operator: A, an :class:`Operator` (e.g. ``GGNOperator(...)``, ``HVPOperator(...)``) or a dense
            symmetric matrix. Runs inside ``operator.frozen()``, so model operators reuse their graphs.
        b: right-hand side(s), (n,) or (n, m) (tensor or numpy array; moved to the operator's device
            and dtype). The m columns are solved together, one block product per iteration, each
            with its own coefficients and stopping; finished columns leave the block.
        damping: lambda >= 0 in ``(A + lambda I) x = b`` (e.g. Tikhonov/Levenberg-Marquardt damping).
        x0: warm start, shaped like ``b`` (default zeros).
        rtol, atol: a column stops when ``||b - (A + damping I) x|| <= max(rtol ||b||, atol)``, checked on
            the true residual at the end. Default rtol: 1e-10 for float64, 1e-4 for float32.
        max_iters: iterations per column (default ``max(10 n, 1000)``).
        preconditioner: ``M^{-1}``: a callable mapping an (n, k) block to (n, k), or a positive (n,)
            tensor, the diagonal of ``M`` (applied as ``r / d``; e.g. ``d.abs() + damping`` from a
            Hessian or GGN diagonal). Must be symmetric positive definite.
        on_indefinite: "raise" (default): a direction with ``p^T (A + damping I) p <= 0`` raises
            :class:`NotPositiveDefiniteError`; "return": that column stops with the iterate reached
            so far, ``converged=False``, and ``info["negative_curvature"][column]`` holds the direction
            (as truncated-Newton methods use it).
        check_every: iterations between the host's looks at the residual norms (its only sync);
            default 1 on the CPU, 8 on accelerators.
        verbose: show a progress bar.

    Returns:
        A :class:`SolveResult` (``x``, ``converged``, ``iterations``, ``residual_norms`` history,
        ``num_products``, ``info``). Warns (``ConvergenceWarning``) when a column did not converge.

    Raises:
        NotPositiveDefiniteError: see ``on_indefinite``.
    """
    if on_indefinite not in ON_INDEFINITE:
        raise ValueError(f"cg: on_indefinite={on_indefinite!r} is not known; use 'raise' or 'return'.")
    problem = check_problem("cg", operator, b, damping, x0, rtol, atol, max_iters, preconditioner, check_every)
    recurrence = ConjugateGradients(on_indefinite, problem.damping)
    result = BlockSolve(problem, recurrence).run(verbose)
    if recurrence.negative_curvature:
        result.info["negative_curvature"] = recurrence.negative_curvature
    return result
