"""The options of model operators, in one place for every one-call helper.

The operators' constructors define their options (names, defaults and checks; their meaning is
documented on :class:`~hessian_eigenthings.operators.hvp.HVPOperator`). This module derives from
those constructors what the helpers (``compute_hessian_eigenthings``, ``hessian_trace``, ...)
accept, so that no list of names is written twice and every helper accepts every option of the
operator it builds, and it holds the defaults the helpers share with the operators.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

# Micro-batches hold at most this many rows unless max_possible_gpu_samples says otherwise. Splitting
# is exact, so the bound only trades a little speed for peak memory; the same default everywhere
# makes a helper compute exactly what the operator it builds computes.
DEFAULT_MAX_POSSIBLE_GPU_SAMPLES = 256


def operator_options(operator_class: type) -> tuple[str, ...]:
    """The keyword-only options of ``operator_class``'s constructor and of the classes it builds on,
    e.g. ``backend`` and ``batched`` of :class:`HVPOperator` and every :class:`ModelOperator` option."""
    names: list[str] = []
    for cls in operator_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.kind is parameter.KEYWORD_ONLY and parameter.name not in names:
                names.append(parameter.name)
    return tuple(names)


def check_operator_options(caller: str, operator_class: type, options: Iterable[str]) -> None:
    """Raise a TypeError naming the options of ``operator_class`` if ``options`` holds another name."""
    known = operator_options(operator_class)
    unknown = [name for name in options if name not in known]
    if unknown:
        raise TypeError(
            f"{caller} got unknown keyword argument(s) {', '.join(unknown)}; the options of "
            f"{operator_class.__name__} are {', '.join(known)}."
        )


def split_options(
    caller: str, kwargs: dict[str, Any], operator_class: type, estimator: Callable[..., Any], fixed: Iterable[str] = ()
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a helper's keyword arguments into ``operator_class``'s options and ``estimator``'s
    arguments (less ``fixed``, the ones the helper sets itself); an unknown name is a TypeError
    that lists both."""
    fixed = set(fixed) | {"operator"}
    parameters = inspect.signature(estimator).parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    accepted = [p.name for p in parameters if p.name not in fixed and p.kind is not p.VAR_KEYWORD]
    options = operator_options(operator_class)
    unknown = [name for name in kwargs if name not in accepted and name not in options]
    if unknown and not takes_any:
        raise TypeError(
            f"{caller} got unknown keyword argument(s) {', '.join(unknown)}. Its own options: "
            f"{', '.join(accepted)}; operator options: {', '.join(options)}."
        )
    operator_kwargs = {name: value for name, value in kwargs.items() if name in options}
    rest = {name: value for name, value in kwargs.items() if name not in options}
    return operator_kwargs, rest
