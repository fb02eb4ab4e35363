"""The eigensolvers by name, with the keywords each accepts.

``compute_hessian_eigenthings(mode=...)``, the sharpness tracker and :func:`solver_memory` look
solvers up here instead of reading signatures. Adding a solver takes one file (its algorithm, using
:mod:`.contract` for its arguments and result) and one :func:`register_solver` call at the end of
this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..operators.base import Operator
from .arpack import lanczos
from .auto import auto_eigensolve
from .block_lanczos import block_lanczos
from .contract import COMMON_KEYWORDS
from .memory import SolverMemory, arpack_plan, native_plan, power_plan
from .power_iter import deflated_power_iteration
from .result import EigenResult
from .thick_restart import thick_restart_lanczos

#: Keywords that only power iteration takes; given to ``mode="auto"`` they choose it.
POWER_ONLY_KEYWORDS = frozenset({"momentum", "power_iter_steps", "power_iter_err_threshold"})


@dataclass(frozen=True)
class RegisteredSolver:
    """One solver under its mode name.

    Attributes:
        name: the mode name (``compute_hessian_eigenthings(mode=name)``).
        function: the public solver, called as ``function(operator, num_eigenthings=k, **keywords)``.
        keywords: every keyword it accepts besides ``operator`` and ``num_eigenthings``.
        krylov: it needs a fixed (not stochastic) operator.
        summary: one line for messages and docs.
        memory: ``memory(n, k, dtype, device, options) -> SolverMemory``, its memory model.
        chooser: for a mode that picks another solver ("auto"): ``chooser(keywords) -> name``, what it
            runs before measuring anything (with ``function`` too, ``run`` calls the function, which
            measures and chooses).
    """

    name: str
    function: Optional[Callable[..., EigenResult]]
    keywords: frozenset
    krylov: bool
    summary: str
    memory: Optional[Callable[..., SolverMemory]] = None
    chooser: Optional[Callable[[dict], str]] = None

    def resolve(self, keywords: dict) -> "RegisteredSolver":
        """The solver that runs for these keywords (itself, unless it is a choosing mode)."""
        return get_solver(self.chooser(keywords)) if self.chooser is not None else self

    def run(self, operator: Operator, num_eigenthings: int, **keywords: Any) -> EigenResult:
        """Solve with keywords from :attr:`keywords` (others raise TypeError, naming what is accepted).

        A choosing mode with a function of its own ("auto") runs that function, which chooses by
        measurement; one without runs the solver its chooser names."""
        check_keywords(self, keywords)
        if self.function is not None:
            return self.function(operator, num_eigenthings=num_eigenthings, **keywords)
        return run_chosen(self.name, self.chooser(keywords), operator, num_eigenthings, keywords)


def run_chosen(mode: str, chosen: str, operator: Any, num_eigenthings: Any, keywords: dict) -> EigenResult:
    """Run the solver registered as ``chosen`` for a choosing ``mode``, with the keywords it takes; an
    option it would ignore is a TypeError."""
    solver = get_solver(chosen)
    unused = [name for name, value in keywords.items() if name not in solver.keywords and value is not None]
    if unused:
        raise TypeError(
            f"mode={mode!r} chose {solver.name!r}, which does not take {', '.join(unused)}; "
            f"choose the mode yourself (mode=...) or leave out those options."
        )
    keywords = {name: value for name, value in keywords.items() if name in solver.keywords}
    return solver.function(operator, num_eigenthings=num_eigenthings, **keywords)


_REGISTRY: dict[str, RegisteredSolver] = {}


def register_solver(
    name: str, function: Optional[Callable[..., EigenResult]], keywords: Any, *, krylov: bool, summary: str,
    memory: Optional[Callable[..., SolverMemory]] = None, chooser: Optional[Callable[[dict], str]] = None,
) -> RegisteredSolver:
    """Register a solver under ``name`` (replacing one of that name); returns its entry."""
    entry = RegisteredSolver(name, function, frozenset(keywords), krylov, summary, memory, chooser)
    _REGISTRY[name] = entry
    return entry


def get_solver(name: Any) -> RegisteredSolver:
    """The solver registered as ``name``; ValueError listing the known names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"mode={name!r} is not known; choose one of {', '.join(map(repr, _REGISTRY))}.")
    return _REGISTRY[name]


def solver_names() -> tuple[str, ...]:
    """The registered mode names, in registration order."""
    return tuple(_REGISTRY)


def check_keywords(entry: RegisteredSolver, keywords: dict, extra: tuple = (), where: str = "") -> None:
    """TypeError naming the keywords ``entry`` does not accept (``extra`` names are accepted too)."""
    unknown = [name for name in keywords if name not in entry.keywords and name not in extra]
    if unknown:
        raise TypeError(
            f"{where or entry.name} got unknown keyword argument(s) {', '.join(unknown)} for mode={entry.name!r}. "
            f"Its solver options: {', '.join(sorted(entry.keywords))}"
            + (f"; other options: {', '.join(extra)}." if extra else ".")
        )


def choose_auto(keywords: dict) -> str:
    """What ``mode="auto"`` runs before any measurement: power iteration when given an option only it
    has (``momentum``, ``power_iter_steps``, ``power_iter_err_threshold``: the call was written for
    the earlier default); block Lanczos when given ``block_size``; otherwise thick-restart Lanczos,
    which :func:`~hessian_eigenthings.solvers.auto.auto_eigensolve` replaces by block Lanczos where
    the operator's measured costs predict blocks to be faster."""
    if any(keywords.get(name) is not None for name in POWER_ONLY_KEYWORDS):
        return "power_iter"
    if keywords.get("block_size") is not None:
        return "block_lanczos"
    return "thick_restart"


_NATIVE = COMMON_KEYWORDS | {"num_lanczos_vectors"}
_POWER = COMMON_KEYWORDS | POWER_ONLY_KEYWORDS

register_solver(
    "thick_restart", thick_restart_lanczos, _NATIVE, krylov=True, memory=native_plan(block=False),
    summary="thick-restart Lanczos on the operator's device (the fewest products)",
)
register_solver(
    "block_lanczos", block_lanczos, _NATIVE | {"block_size"}, krylov=True, memory=native_plan(block=True),
    summary="thick-restart block Lanczos on batched products (finds eigenvalues repeated up to block_size times)",
)
register_solver(
    "lanczos", lanczos, COMMON_KEYWORDS | {"num_lanczos_vectors"}, krylov=True, memory=arpack_plan,
    summary="implicitly restarted Lanczos by ARPACK (scipy), in float64 on the host",
)
register_solver(
    "power_iter", deflated_power_iteration, _POWER, krylov=False, memory=power_plan,
    summary="deflated power iteration (also for stochastic operators)",
)
register_solver(
    "auto", auto_eigensolve, _NATIVE | {"block_size"} | _POWER, krylov=True, chooser=choose_auto,
    summary="thick_restart, or block_lanczos where measured costs predict it faster; block_lanczos when "
            "block_size is given; power_iter when given its options",
)
