"""MINRES for symmetric (possibly indefinite) systems ``(A + damping I) x = b``.

Paige & Saunders (1975), "Solution of sparse indefinite systems of linear equations": the Lanczos
process builds a tridiagonal T_k, Givens rotations keep its QR factorisation up to date, and x_k
minimises ``||b - A x||`` over the Krylov space (in the ``M^{-1}`` norm with a preconditioner M,
which must be positive definite). Each right-hand side runs its own recurrence; the block shares
one operator product per iteration (see :mod:`.driver`).

The residual norm that stops a column is the 2-norm: without a preconditioner it is the
recurrence's ``phibar``; with one, the residual vector is carried along (``A w`` follows ``w``
from the same product, so this costs no product).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..operators.base import runs_frozen
from .driver import BlockSolve, State
from .problem import LinearProblem, Preconditioner, check_problem
from .result import SolveResult

# Iterations over which a least-squares solution must have left the residual unchanged before a
# column is stopped as singular.
STALL_WINDOW = 5


class Minres:
    """The MINRES recurrence for a block of independent columns (see :class:`.driver.Recurrence`)."""

    name = "minres"

    def start(self, problem: LinearProblem, x: Tensor, r: Tensor) -> State:
        y = r if problem.precondition is None else problem.precondition(r)
        beta2 = (r * y).sum(dim=0)
        if problem.precondition is not None and bool((beta2 <= 0).any()):  # a start is on the host anyway
            raise self.rejection({}, {}, 0, 0, 0)
        beta = beta2.sqrt()
        zeros_k = torch.zeros_like(beta)
        state = {
            "x": x, "r1": r, "r2": r.clone(), "y": y.clone(), "w": torch.zeros_like(r), "w2": torch.zeros_like(r),
            "beta": beta, "oldb": zeros_k.clone(), "dbar": zeros_k.clone(), "epsln": zeros_k.clone(),
            "phibar": beta.clone(), "cs": torch.full_like(beta, -1.0), "sn": zeros_k.clone(),
            "anorm": zeros_k.clone(),
            # the residual norms of the last STALL_WINDOW iterations (oldest first), and the smallest
            # ||A r|| / (||A|| ||r||) among them
            "recent": torch.full((STALL_WINDOW, beta.shape[0]), float("inf"), dtype=beta.dtype, device=beta.device),
            "ratios": torch.full((STALL_WINDOW, beta.shape[0]), float("inf"), dtype=beta.dtype, device=beta.device),
        }
        if problem.precondition is not None:
            state.update({"res": r.clone(), "aw": torch.zeros_like(r), "aw2": torch.zeros_like(r)})
        return state

    def step(self, problem: LinearProblem, state: State) -> tuple[State, Tensor, Tensor, Tensor, State]:
        eps = torch.finfo(state["x"].dtype).eps
        beta, oldb = state["beta"], state["oldb"]
        # Lanczos: the next basis vector v and the next column (alfa, beta_next) of T.
        v = state["y"] / beta
        av = problem.apply(v)
        y = av - torch.where(oldb > 0, beta / oldb, torch.zeros_like(beta)) * state["r1"]
        alfa = (v * y).sum(dim=0)
        y = y - (alfa / beta) * state["r2"]
        r1, r2 = state["r2"], y
        y = r2 if problem.precondition is None else problem.precondition(r2)
        beta2 = (r2 * y).sum(dim=0)
        beta_next = beta2.clamp_min(0).sqrt()
        anorm = torch.maximum(state["anorm"], torch.sqrt(alfa**2 + beta**2 + beta_next**2))
        # Apply the previous rotation to the new column, then make the rotation that zeroes beta_next.
        cs, sn, dbar = state["cs"], state["sn"], state["dbar"]
        oldeps = state["epsln"]
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta_next
        dbar = -cs * beta_next
        gamma = torch.sqrt(gbar**2 + beta_next**2)
        # gamma = 0: the Krylov space is invariant and b has a part outside the range of A + damping I
        # (a singular, inconsistent system); the current x is already the least-squares solution.
        singular = gamma <= eps * anorm
        safe_gamma = torch.where(singular, torch.ones_like(gamma), gamma)
        cs, sn = gbar / safe_gamma, beta_next / safe_gamma
        phi = cs * state["phibar"]
        phibar = sn * state["phibar"]
        w = (v - oldeps * state["w2"] - delta * state["w"]) / safe_gamma
        new = {
            "x": state["x"] + phi * w, "r1": r1, "r2": r2, "y": y, "w": w, "w2": state["w"],
            "beta": beta_next, "oldb": beta, "dbar": dbar, "epsln": epsln, "phibar": phibar, "cs": cs, "sn": sn,
            "anorm": anorm,
        }
        if problem.precondition is not None:
            aw = (av - oldeps * state["aw2"] - delta * state["aw"]) / safe_gamma
            new.update({"res": state["res"] - phi * aw, "aw": aw, "aw2": state["aw"]})
            rnorm = torch.linalg.vector_norm(new["res"], dim=0)
        else:
            rnorm = phibar.abs()
        # ||A r|| of the previous iterate, from the recurrence. When it has been negligible against
        # ||A|| ||r|| (rounding keeps the ratio above about sqrt(eps), hence the floor) AND the
        # residual has not moved for STALL_WINDOW iterations, x solves the least-squares problem of a
        # singular (or numerically singular) system and the residual cannot fall further; going on
        # would only let rounding grow x. A small ratio alone is not enough: an ill-conditioned
        # system has it too while its residual still falls slowly.
        ar_norm = phibar.abs() * torch.sqrt(gbar**2 + dbar**2)
        ratio = ar_norm / (anorm * rnorm).clamp_min(torch.finfo(rnorm.dtype).tiny)
        new["recent"] = torch.cat([state["recent"][1:], rnorm.unsqueeze(0)])
        new["ratios"] = torch.cat([state["ratios"][1:], ratio.unsqueeze(0)])
        stalled = rnorm >= (1 - eps**0.5) * state["recent"][0]
        least_squares = (new["ratios"].amin(dim=0) <= max(problem.rtol, eps**0.5)) & stalled
        lanczos_done = beta_next <= eps * anorm  # an invariant Krylov space: nothing further to gain
        # Where singular, keep the old state (the driver merges columns that are not rejected).
        new = {key: torch.where(singular, state[key], value) for key, value in new.items()}
        rnorm = torch.where(singular, self._old_norm(problem, state), rnorm)
        stop = singular | least_squares | lanczos_done
        reject = beta2 < 0  # M is not positive definite
        return new, rnorm, reject, stop, {"beta2": beta2, "ar_norm": ar_norm}

    @staticmethod
    def _old_norm(problem: LinearProblem, state: State) -> Tensor:
        if problem.precondition is not None:
            return torch.linalg.vector_norm(state["res"], dim=0)
        return state["phibar"].abs()

    def rejection(self, state: State, extras: State, local: int, column: int, iteration: int) -> Optional[Exception]:
        return ValueError(
            "minres: the preconditioner is not positive definite (r^T M^-1 r <= 0 for a residual r != 0). MINRES "
            "needs a positive definite M even for an indefinite A: for a Hessian diagonal d pass d.abs() + damping "
            "(or d.abs().clamp_min(eps))."
        )


@runs_frozen
def minres(
    operator: Any,
    b: Any,
    *,
    damping: float = 0.0,
    x0: Optional[Any] = None,
    rtol: Optional[float] = None,
    atol: float = 0.0,
    max_iters: Optional[int] = None,
    preconditioner: Preconditioner = None,
    check_every: Optional[int] = None,
    verbose: bool = True,
) -> SolveResult:
    """Solve ``(A + damping I) x = b`` for a symmetric, possibly indefinite ``A`` (such as a loss
    Hessian) by (preconditioned) MINRES.

    Args:
        operator: A, an :class:`Operator` (e.g. ``HVPOperator(...)``) or a dense symmetric matrix. Runs
            inside ``operator.frozen()``, so model operators reuse their graphs.
        b: right-hand side(s), (n,) or (n, m) (tensor or numpy array; moved to the operator's device
            and dtype). The m columns are solved together, one block product per iteration, each
            with its own coefficients and stopping; finished columns leave the block.
        damping: a shift lambda in ``(A + lambda I) x = b`` (any sign; it must not make the system singular).
        x0: warm start, shaped like ``b`` (default zeros).
        rtol, atol: a column stops when ``||b - (A + damping I) x|| <= max(rtol ||b||, atol)``, checked on
            the true residual at the end. Default rtol: 1e-10 for float64, 1e-4 for float32.
        max_iters: iterations per column (default ``max(10 n, 1000)``).
        preconditioner: ``M^{-1}``, symmetric positive definite: a callable mapping an (n, k) block to
            (n, k), or a positive (n,) tensor, the diagonal of ``M`` (applied as ``r / d``; e.g.
            ``d.abs() + damping`` from a Hessian diagonal).
        check_every: iterations between the host's looks at the residual norms (its only sync);
            default 1 on the CPU, 8 on accelerators.
        verbose: show a progress bar.

    Returns:
        A :class:`SolveResult`. A singular system whose ``b`` is not in the range of the operator has
        no solution: once the residual stops falling at a least-squares solution, the column stops with
        ``converged=False`` and is listed in ``info["singular"]``. Warns (``ConvergenceWarning``) when a
        column did not converge.
    """
    problem = check_problem("minres", operator, b, damping, x0, rtol, atol, max_iters, preconditioner, check_every)
    return BlockSolve(problem, Minres()).run(verbose)
