"""How the tracker calls an eigensolver: a mode of ``compute_hessian_eigenthings`` or any callable,
warm-started from the previous eigenvectors.

A mode is looked up in the solver registry (``hessian_eigenthings.solvers.registry``) and spoken to
through the keywords every solver shares: ``which``, ``tol``, ``verbose`` and the warm start
``init_vecs`` (all previous eigenvectors, (k, n)), so a solver added to the registry works here
unchanged. A user's callable is asked only for what its signature names: ``which`` and ``verbose``
when accepted; the tolerance as ``tol`` or, for a power-iteration-like signature,
``power_iter_err_threshold``; the warm start as ``init_vecs`` or else ``init_vec`` (one vector: the
sum of the previous eigenvectors, whose Krylov space holds every one of them).

Why ``"lanczos"`` is the default (``benchmarks/tracking_warm_start.py``: the digits MLP under
full-batch GD at the edge of stability, tracked every 20 steps, relative residual 1e-4; products per
tracked step after the first, mean for k = 1 / k = 3):

* lanczos warm-started (the default): 12.6 / 21.2. ARPACK takes one start vector (the sum of the
  previous eigenvectors) and handles "LA" and "SA" directly. A warm step gets a short Krylov basis
  (``num_lanczos_vectors = k + 4``); from a random start the same short basis needs 17.5 / 25.8.
* lanczos cold with its default basis (the first, cold step): 42 / 44.
* deflated power iteration warm-started with ``init_vecs``: 38.7 / 424 (cold: 59 / 555). The warm
  start also seeds the largest-magnitude solve that "LA"/"SA" need for their shift, but power
  iteration crawls on the clustered top eigenvalues at the edge of stability.

So the saving of a warm step over a cold start comes partly from the start vector and partly from
the short basis that a good start vector makes safe. If a short warm solve fails (NoConvergenceError,
e.g. for tiny clustered "SA" eigenvalues), it is repeated with the solver's default basis and the
short basis is not used again. The native solvers (``"thick_restart"``, ``"block_lanczos"``) get
the whole block of previous eigenvectors through ``init_vecs``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator
from ..solvers.arpack import NoConvergenceError
from ..solvers.registry import get_solver, solver_names
from ..solvers.result import converged_mask, residual_norms
from ..utils import logger

SolverSpec = Union[str, Callable[..., Any]]

# Solver settings used on warm-started steps only, by mode: a start vector close to the answer needs
# only a short Krylov basis, while a cold start needs the solver's generous default.
_WARM_DEFAULTS: dict[str, Callable[[int, int], dict[str, Any]]] = {
    "lanczos": lambda k, n: {"num_lanczos_vectors": min(n, k + 4)},
}

# Arguments the tracker sets itself; a user's solver_kwargs may not.
_RESERVED = ("operator", "num_eigenthings", "which", "init_vec", "init_vecs", "to_numpy")


@dataclass
class SolveOutcome:
    """One tracked solve: eigenvalues (k,) float64, eigenvectors (k, n) on the operator's device,
    residuals ``||A v - lambda v||`` (k,), converged flags (k,), products used, and whether it was
    warm-started."""

    eigenvalues: np.ndarray
    eigenvectors: Tensor
    residuals: np.ndarray
    converged: np.ndarray
    products: int
    warm: bool


class TrackingSolver:
    """A solver bound to the tracker's settings: ``solve(operator, k, init)`` -> :class:`SolveOutcome`.

    Args:
        solver: a mode name of ``compute_hessian_eigenthings`` (a registered solver) or a callable
            ``solver(operator, num_eigenthings, **kwargs)`` returning an ``EigenResult`` or a
            ``(eigenvalues (k,), eigenvectors (k, n))`` pair; its keyword arguments are matched as
            for the modes (see the module docstring).
        which: "LA", "SA" or "LM".
        tol: relative residual tolerance ``||A v - lambda v|| <= tol * |lambda|``.
        solver_kwargs: further keyword arguments for the solver (they win over the tracker's).
        verbose: let the solver show its progress bar.
    """

    def __init__(
        self, solver: SolverSpec, which: str, tol: float, solver_kwargs: Optional[dict] = None, verbose: bool = False
    ) -> None:
        if isinstance(solver, str):
            if solver not in solver_names():
                raise ValueError(
                    f"solver={solver!r} is not a known mode; choose one of {', '.join(map(repr, solver_names()))} "
                    f"or pass a callable solver(operator, num_eigenthings, which=..., init_vecs=...)."
                )
            entry = get_solver(solver)
            runner = entry.run
            # a registered solver takes the core keywords by name: nothing to read from a signature
            self.accepted, self.open_kwargs = set(entry.keywords), False
            self.name = solver
        elif callable(solver):
            runner = solver
            self.name = getattr(solver, "__name__", type(solver).__name__)
            self.accepted, self.open_kwargs = _accepted_keywords(solver)
        else:
            raise TypeError(
                f"solver must be a mode name ({', '.join(map(repr, solver_names()))}) or a callable, "
                f"got {type(solver).__name__}."
            )
        self.mode = solver if isinstance(solver, str) else None
        self.runner = runner
        self.which = which
        self.tol = float(tol)
        self.verbose = bool(verbose)
        self.user_kwargs = dict(solver_kwargs or {})
        clash = [name for name in self.user_kwargs if name in _RESERVED]
        if clash:
            raise ValueError(
                f"solver_kwargs may not set {', '.join(clash)}: the tracker sets them (use the tracker's "
                f"num_eigenthings / which arguments; the warm start is automatic)."
            )
        unknown = [name for name in self.user_kwargs if not self._accepts(name)]
        if unknown:
            raise TypeError(
                f"solver_kwargs: {self.name} does not accept {', '.join(unknown)}; it accepts "
                f"{', '.join(sorted(self.accepted)) or 'no keyword arguments'}."
            )
        self.short_warm_settings = True
        self.warm_style = "init_vecs" if self._accepts("init_vecs") else "init_vec" if self._accepts("init_vec") else None
        if self.warm_style is None:
            logger.warning("Solver %s takes neither init_vecs nor init_vec: every tracked step is a cold solve.", self.name)

    def _accepts(self, name: str) -> bool:
        return name in self.accepted or self.open_kwargs

    def base_kwargs(self, operator: Operator, k: int) -> dict[str, Any]:
        """The keyword arguments of a cold solve."""
        kwargs: dict[str, Any] = {}
        if self._accepts("which"):
            kwargs["which"] = self.which
        if "tol" in self.accepted:
            kwargs["tol"] = self.tol
        elif "power_iter_err_threshold" in self.accepted:
            kwargs["power_iter_err_threshold"] = self.tol
        elif self.open_kwargs:
            kwargs["tol"] = self.tol
        if "verbose" in self.accepted:
            kwargs["verbose"] = self.verbose
        kwargs.update(self.user_kwargs)
        return kwargs

    def solve(self, operator: Operator, k: int, init: Optional[Tensor]) -> SolveOutcome:
        """Top-k eigenpairs of ``operator`` in the sense of ``which``, warm-started from ``init`` ((m, n)
        rows) when given.

        A warm solve first uses the mode's short warm settings (if any); if it raises
        NoConvergenceError, it is repeated with the solver's own settings and the short ones are
        dropped for the rest of the run (that end of the spectrum needs the larger basis); if that
        fails too, the solve starts cold.
        """
        first = operator.num_products
        if init is not None and self.warm_style is not None:
            init = init[:k].to(device=operator.device, dtype=operator.dtype)
            kwargs = self.base_kwargs(operator, k)
            kwargs[self.warm_style] = init if self.warm_style == "init_vecs" else _combine(init)
            short = _WARM_DEFAULTS.get(self.mode or "") if self.short_warm_settings else None
            attempts = []
            if short is not None:
                attempts.append({**{n: v for n, v in short(k, operator.size).items() if n not in self.user_kwargs}, **kwargs})
            attempts.append(kwargs)
            for number, attempt in enumerate(attempts):
                try:
                    return self._finish(operator, k, self.runner(operator, k, **attempt), first, warm=True)
                except NoConvergenceError as exc:
                    if number == 0 and len(attempts) == 2:
                        self.short_warm_settings = False
                        logger.info("Warm-started %s with a short basis did not converge; using the solver's "
                                    "default basis for warm starts from now on. (%s)", self.name, exc)
                    else:
                        logger.warning("Warm-started %s did not converge; solving from a cold start. (%s)",
                                       self.name, exc)
        return self._finish(operator, k, self.runner(operator, k, **self.base_kwargs(operator, k)), first, warm=False)

    def _finish(self, operator: Operator, k: int, result: Any, first: int, warm: bool) -> SolveOutcome:
        values, vectors = _unpack(result)
        if isinstance(values, Tensor):
            values = values.detach().cpu().numpy()
        values = np.atleast_1d(np.asarray(values, dtype=np.float64))
        vectors = torch.as_tensor(vectors).detach().to(device=operator.device, dtype=operator.dtype)
        if vectors.dim() == 1:
            vectors = vectors.unsqueeze(0)
        if values.shape != (k,) or vectors.shape != (k, operator.size):
            raise ValueError(
                f"Solver {self.name} returned eigenvalues of shape {values.shape} and eigenvectors of shape "
                f"{tuple(vectors.shape)}; expected ({k},) and ({k}, {operator.size})."
            )
        residuals = getattr(result, "residuals", None)
        converged = getattr(result, "converged", None)
        if residuals is None or len(np.atleast_1d(residuals)) != k:
            vals_t = torch.as_tensor(values, dtype=operator.dtype, device=operator.device)
            res_t, _ = residual_norms(operator, vals_t, vectors.T.contiguous())
            residuals = res_t.double().cpu().numpy()
            converged = converged_mask(res_t, vals_t, self.tol, operator.dtype).cpu().numpy()
        residuals = np.asarray(residuals, dtype=np.float64)
        if converged is None or len(np.atleast_1d(converged)) != k:
            converged = residuals <= self.tol * np.abs(values)
        return SolveOutcome(
            values, vectors, residuals, np.asarray(converged, dtype=bool), operator.num_products - first, warm
        )


def _accepted_keywords(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    """(named keyword parameters, whether it takes **kwargs) of a user's solver ``fn``; unknown
    signatures take anything."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set(), True
    names = {name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    return names - {"operator", "num_eigenthings"}, open_kwargs


def _combine(rows: Tensor) -> Tensor:
    """One start vector for a single-vector Krylov solver: the sum of the (orthonormal) rows, whose
    Krylov space of dimension k contains each row when the rows are eigenvectors."""
    total = rows.sum(dim=0)
    if float(torch.linalg.vector_norm(total)) <= 1e-3 * float(torch.linalg.vector_norm(rows[0])):
        return rows[0].clone()
    return total


def _unpack(result: Any) -> tuple[Any, Any]:
    if hasattr(result, "eigenvalues") and hasattr(result, "eigenvectors"):
        return result.eigenvalues, result.eigenvectors
    try:
        values, vectors = result
    except (TypeError, ValueError):
        raise TypeError(
            f"A tracking solver must return an EigenResult or an (eigenvalues, eigenvectors) pair, got "
            f"{type(result).__name__}."
        ) from None
    return values, vectors

