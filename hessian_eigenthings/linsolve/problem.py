"""The checked description of a linear system ``(A + damping I) x = b`` that every solver of this
package works on: the operator, the right-hand sides as an (n, m) block, the warm start, the
tolerances and the preconditioner."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator
from ..utils import check_positive_int

#: What a preconditioner may be: a callable applying ``M^{-1}`` to an (n, k) block, or the (n,)
#: diagonal of ``M`` (which is then applied as ``r / d``).
Preconditioner = Union[None, Callable[[Tensor], Tensor], Tensor, np.ndarray]

# Relative residual tolerance by dtype when none is given: well above what rounding allows for a
# moderately conditioned system, and as tight as the dtype makes sensible.
_DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def default_rtol(dtype: torch.dtype) -> float:
    """The default relative residual tolerance for vectors of ``dtype``: 1e-10 in float64, 1e-4 in
    float32, 1e-2 in half precision."""
    return _DEFAULT_RTOL.get(dtype, 1e-4)


def default_max_iters(n: int) -> int:
    """The default iteration cap for a system of size n: ``max(10 n, 1000)``."""
    return max(10 * n, 1000)


@dataclass
class LinearProblem:
    """A checked system ``(A + damping I) X = B`` with m right-hand sides.

    Attributes:
        operator: A.
        damping: the multiple of the identity added to A.
        rhs: B, (n, m) on the operator's device and dtype.
        x0: the warm start, (n, m), or None for zeros.
        squeeze: whether ``b`` was given as a vector (the result is then returned as one).
        rtol, atol: a column has converged when ``||b_j - (A + damping I) x_j|| <= max(rtol ||b_j||, atol)``.
        max_iters: iterations allowed per column.
        check_every: iterations between the host's looks at the residual norms.
        precondition: ``M^{-1}`` applied to an (n, k) block, or None.
    """

    operator: Operator
    damping: float
    rhs: Tensor
    x0: Optional[Tensor]
    squeeze: bool
    rtol: float
    atol: float
    max_iters: int
    check_every: int
    precondition: Optional[Callable[[Tensor], Tensor]]

    def apply(self, mat: Tensor) -> Tensor:
        """``(A + damping I) mat`` for an (n, k) block."""
        out = self.operator.apply_block(mat)
        if self.damping:
            out = out.add(mat, alpha=self.damping)
        return out

    def thresholds(self, rhs_norms: Tensor) -> Tensor:
        """(m,) residual norms below which each column has converged."""
        return torch.clamp(rhs_norms * self.rtol, min=self.atol)


def check_problem(
    solver: str,
    operator: Any,
    b: Any,
    damping: Any,
    x0: Any,
    rtol: Any,
    atol: Any,
    max_iters: Any,
    preconditioner: Preconditioner,
    check_every: Any,
) -> LinearProblem:
    """Check a solver's arguments before any product is spent; errors name the argument and say
    what it accepts. ``solver`` is the public name used in messages."""
    op = as_operator(operator)
    if op.is_stochastic:
        raise ValueError(
            f"{solver}: the operator is stochastic (every product uses another mini-batch), so the system it "
            f"defines changes from one iteration to the next and a Krylov solver cannot converge. Build it with "
            f"full_dataset=True (or pass one fixed batch as the dataloader)."
        )
    rhs, squeeze = _as_block(b, op, "b", solver)
    start = None
    if x0 is not None:
        start, x0_is_vector = _as_block(x0, op, "x0", solver)
        if start.shape != rhs.shape or x0_is_vector != squeeze:
            raise ValueError(f"{solver}: x0 must have the shape of b, {tuple(b.shape)}; got {tuple(x0.shape)}.")
    damping = _finite_float(damping, "damping", solver)
    rtol = default_rtol(op.dtype) if rtol is None else _finite_float(rtol, "rtol", solver)
    atol = _finite_float(atol, "atol", solver)
    if rtol < 0 or atol < 0 or (rtol == 0 and atol == 0):
        raise ValueError(
            f"{solver}: rtol and atol must be >= 0 and not both 0 (got rtol={rtol}, atol={atol}); the solve stops "
            f"when ||b - A x|| <= max(rtol ||b||, atol)."
        )
    if rtol >= 1:
        raise ValueError(f"{solver}: rtol={rtol} asks for no reduction of the residual at all; use a value below 1.")
    # In exact arithmetic both methods finish within n iterations. In floating point a spread-out
    # spectrum makes them behave as on a continuous one (about sqrt(cond) * log(1/rtol) iterations,
    # which can be several times n for small n), so the cap is generous.
    max_iters = default_max_iters(op.size) if max_iters is None else check_positive_int(max_iters, "max_iters")
    if check_every is None:
        # A look at the residuals is a host sync: free on the CPU, worth batching on accelerators.
        check_every = 1 if op.device.type == "cpu" else 8
    check_every = check_positive_int(check_every, "check_every")
    precondition = _preconditioner(preconditioner, op, solver)
    return LinearProblem(op, damping, rhs, start, squeeze, rtol, atol, max_iters, check_every, precondition)


def _as_block(value: Any, op: Operator, name: str, solver: str) -> tuple[Tensor, bool]:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{solver}: {name} must be a torch.Tensor (or numpy array) of shape (n,) or (n, m) with n={op.size}, "
            f"got {type(value).__name__}."
        )
    if value.dim() not in (1, 2) or value.shape[0] != op.size:
        raise ValueError(
            f"{solver}: {name} must have shape (n,) or (n, m) with n={op.size} (the operator's size), got "
            f"{tuple(value.shape)}."
        )
    if value.is_complex() or not (value.dtype.is_floating_point or value.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{solver}: {name} must be real, got dtype {value.dtype}.")
    block = value.detach().to(device=op.device, dtype=op.dtype)
    if not bool(torch.isfinite(block).all()):
        raise ValueError(f"{solver}: {name} contains NaN or Inf entries.")
    return (block.unsqueeze(1), True) if value.dim() == 1 else (block, False)


def _finite_float(value: Any, name: str, solver: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{solver}: {name} must be a real number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{solver}: {name} must be finite, got {value}.")
    return value


def _preconditioner(preconditioner: Preconditioner, op: Operator, solver: str) -> Optional[Callable[[Tensor], Tensor]]:
    if preconditioner is None:
        return None
    if isinstance(preconditioner, (Tensor, np.ndarray)):
        diag = torch.as_tensor(preconditioner).detach()
        if diag.dim() != 1 or diag.shape[0] != op.size:
            raise ValueError(
                f"{solver}: a tensor preconditioner is the diagonal of M, shape (n,) with n={op.size}; got shape "
                f"{tuple(diag.shape)}. For any other M pass a callable applying M^-1 to an (n, k) block."
            )
        diag = diag.to(device=op.device, dtype=op.dtype)
        if not bool(torch.isfinite(diag).all()) or not bool((diag > 0).all()):
            worst = float(diag.min()) if bool(torch.isfinite(diag).all()) else float("nan")
            raise ValueError(
                f"{solver}: the diagonal preconditioner must be finite and positive (M must be positive definite), "
                f"but its smallest entry is {worst:.3g}. A Hessian diagonal can be negative or zero: pass e.g. "
                f"d.abs() + damping, or d.clamp_min(eps) + damping."
            )
        inverse = diag.reciprocal().unsqueeze(1)
        return lambda block: block * inverse
    if not callable(preconditioner):
        raise TypeError(
            f"{solver}: preconditioner must be None, a callable applying M^-1 to an (n, k) block, or the (n,) "
            f"diagonal of M as a tensor; got {type(preconditioner).__name__}."
        )

    def checked(block: Tensor) -> Tensor:
        out = preconditioner(block)
        if not isinstance(out, Tensor) or out.shape != block.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"{solver}: the preconditioner must map an (n, k) block to an (n, k) block (M^-1 applied to each "
                f"column); given shape {tuple(block.shape)} it returned {shape}."
            )
        if out.dtype != block.dtype or out.device != block.device:
            out = out.to(device=block.device, dtype=block.dtype)
        return out

    return checked
