"""What a tracked step measures besides eigenvalues, and the guard that keeps the training run's
random state as it was."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..operators.base import Operator
from ..operators.model_operator import ModelOperator
from ..spectrum.trace import hutchpp_trace
from ..utils import preserved_global_rng

# The built-in extras a record carries by default, and those that can be asked for by name.
BUILTIN_EXTRAS = ("loss", "grad_norm")
KNOWN_EXTRAS = BUILTIN_EXTRAS + ("trace",)


@dataclass
class TrackingContext:
    """What an extras hook receives at a tracked step.

    Attributes:
        step: the training step being recorded.
        model: the user's model (read it, do not change it).
        operator: the operator whose eigenvalues were just computed (the Hessian, or the
            preconditioned Hessian when the tracker has a preconditioner).
        hessian: the Hessian operator over the tracker's dataloader (equal to ``operator`` without a
            preconditioner); e.g. hand it to a trace estimator.
        eigenvalues: (k,) numpy array of this step's eigenvalues.
        eigenvectors: (k, n) tensor of this step's eigenvectors, on the operator's device.
        dataloader: the tracker's fixed dataloader.
        criterion: the loss ``criterion(outputs, targets)``.
    """

    step: int
    model: nn.Module
    operator: Operator
    hessian: ModelOperator
    eigenvalues: np.ndarray
    eigenvectors: Tensor
    dataloader: Any
    criterion: Callable[[Any, Any], Tensor]


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Run a block and restore the global random states afterwards, also when it raises: torch's
    (CPU and CUDA, see :func:`~hessian_eigenthings.utils.preserved_global_rng`), Python's ``random``
    and numpy's global ``np.random`` state."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    try:
        with preserved_global_rng():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def loss_and_gradient(operator: ModelOperator) -> tuple[float, Tensor]:
    """The loss over the operator's dataloader and its gradient, flat (n,), at the current parameters:
    :meth:`ModelOperator.loss_and_gradient` (the same loss whose Hessian the operator is)."""
    if not isinstance(operator, ModelOperator):
        raise TypeError(f"loss_and_gradient needs a model operator such as HVPOperator, got {type(operator).__name__}.")
    return operator.loss_and_gradient()


def builtin_extras(operator: ModelOperator, names: tuple[str, ...], trace_products: int = 60) -> dict[str, float]:
    """The built-in extras named in ``names``, measured on the Hessian ``operator``.

    * "loss": the mean loss over the dataloader; "grad_norm": the Euclidean norm of its gradient over
      the chosen parameters (both from one forward/backward pass).
    * "trace": the Hessian trace by Hutch++ with ``trace_products`` products and a fixed probe seed
      (the same probes at every step, so step-to-step changes are not probe noise); the record gets
      "trace" and its standard error "trace_std_error".
    """
    values: dict[str, float] = {}
    if "loss" in names or "grad_norm" in names:
        loss, grad = loss_and_gradient(operator)
        measured = {"loss": loss, "grad_norm": float(torch.linalg.vector_norm(grad.double()))}
        values.update((name, measured[name]) for name in names if name in measured)
    if "trace" in names:
        estimate = hutchpp_trace(operator, max_products=trace_products, seed=0, verbose=False)
        values.update(trace=estimate.estimate, trace_std_error=estimate.std_error)
    return values


def check_extra_values(values: Any, hook: Any, taken: set[str]) -> dict[str, Any]:
    """Validate what an extras hook returned: a mapping of new names to numbers, lists of numbers or None."""
    name = getattr(hook, "__name__", type(hook).__name__)
    if not isinstance(values, Mapping):
        raise TypeError(f"The extras hook {name} must return a dict of name -> number, got {type(values).__name__}.")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"The extras hook {name} returned a non-string or empty key {key!r}.")
        if key in taken:
            raise ValueError(
                f"The extras hook {name} returned {key!r}, a name the record already has; rename it."
            )
        out[key] = _json_number(value, f"{name}()[{key!r}]")
    return out


def _json_number(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, Tensor):
        value = value.detach().cpu()
        return value.item() if value.dim() == 0 else value.reshape(-1).tolist()
    if isinstance(value, np.ndarray):
        return value.reshape(-1).tolist()
    if isinstance(value, (list, tuple)):
        return [_json_number(item, where) for item in value]
    raise TypeError(
        f"{where} is a {type(value).__name__}; extras must be numbers, lists of numbers or None (they are "
        f"written to the log file)."
    )
