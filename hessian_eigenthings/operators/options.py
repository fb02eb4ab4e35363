"""The options of model operators, in one place for every one-call helper.

The operators' constructors define their options (names, defaults and checks; their meaning is
documented on :class:`~hessian_eigenthings.operators.hvp.HVPOperator`). This module derives from
those constructors what the helpers (``compute_hessian_eigenthings``, ``hessian_trace``, ...)
accept, so that no list of names is written twice and every helper accepts every option of the
operator it builds, and it holds the defaults the helpers share with the operators.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Iterable

import torch

# The default of ``max_possible_gpu_samples`` everywhere: None, resolved by
# :func:`resolve_max_possible_gpu_samples` for the device the products run on. Splitting is exact, so
# the bound only trades speed for peak memory. On a CPU, host memory is rarely what limits a
# product, while every extra micro-batch costs a forward and backward pass of fixed overhead (on the
# digits MLP, batches of 600 split into 256-row pieces made a solve 1.8x slower), so batches are
# used whole. On a GPU a double-backward product holds about three times a training step's
# activations, so micro-batches of at most 256 rows keep a batch size that trains from running out
# of device memory in a product.
DEFAULT_MAX_POSSIBLE_GPU_SAMPLES = None
GPU_MICRO_BATCH_ROWS = 256


def resolve_max_possible_gpu_samples(value: Any, device: Any) -> int:
    """The most rows of a micro-batch: ``value`` (a positive int), or for None the default for
    ``device``: unlimited on a CPU, :data:`GPU_MICRO_BATCH_ROWS` on a GPU."""
    from ..utils import check_positive_int

    if value is None:
        return GPU_MICRO_BATCH_ROWS if torch.device(device).type == "cuda" else sys.maxsize
    return check_positive_int(value, "max_possible_gpu_samples")


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
