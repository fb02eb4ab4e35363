"""The one-call entry point: top eigenpairs of a model's loss Hessian over a dataloader."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import Tensor, nn

from .operators.hvp import HVPOperator
from .operators.options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES, operator_options
from .solvers.arpack import lanczos
from .solvers.block_lanczos import block_lanczos
from .solvers.power_iter import deflated_power_iteration
from .solvers.result import EigenResult
from .solvers.thick_restart import thick_restart_lanczos


def _power_iter_mode(operator: HVPOperator, k: int, **kwargs: Any) -> EigenResult:
    return deflated_power_iteration(operator, num_eigenthings=k, to_numpy=True, **kwargs)


def _lanczos_mode(operator: HVPOperator, k: int, **kwargs: Any) -> EigenResult:
    return lanczos(operator, num_eigenthings=k, **kwargs)


def _thick_restart_mode(operator: HVPOperator, k: int, **kwargs: Any) -> EigenResult:
    return thick_restart_lanczos(operator, num_eigenthings=k, to_numpy=True, **kwargs)


def _block_lanczos_mode(operator: HVPOperator, k: int, **kwargs: Any) -> EigenResult:
    return block_lanczos(operator, num_eigenthings=k, to_numpy=True, **kwargs)


def _auto_mode(operator: HVPOperator, k: int, **kwargs: Any) -> EigenResult:
    """The fastest native solver for where the products run: single-vector thick-restart Lanczos
    on a CPU (the fewest products; batching gains little there), block Lanczos on a GPU (batched
    products cost a fraction per vector) or whenever ``block_size`` is given."""
    if operator.device.type == "cuda" or kwargs.get("block_size") is not None:
        return _block_lanczos_mode(operator, k, **kwargs)
    kwargs.pop("block_size", None)
    return _thick_restart_mode(operator, k, **kwargs)


# mode name -> (runner, the solver function whose keyword arguments the runner accepts)
SOLVER_MODES: dict[str, tuple[Callable[..., EigenResult], Callable[..., Any]]] = {
    "power_iter": (_power_iter_mode, deflated_power_iteration),
    "lanczos": (_lanczos_mode, lanczos),
    "thick_restart": (_thick_restart_mode, thick_restart_lanczos),
    "block_lanczos": (_block_lanczos_mode, block_lanczos),
    "auto": (_auto_mode, block_lanczos),
}

# keyword arguments of compute_hessian_eigenthings that configure the operator, not the solver
_OPERATOR_KWARGS = operator_options(HVPOperator)
# solver arguments that compute_hessian_eigenthings sets itself
_FIXED_SOLVER_ARGS = ("operator", "num_eigenthings", "to_numpy", "use_gpu", "fp16")


def compute_hessian_eigenthings(
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    num_eigenthings: int = 10,
    full_dataset: bool = True,
    mode: str = "power_iter",
    use_gpu: bool = True,
    fp16: bool = False,
    max_possible_gpu_samples: int = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
    **kwargs: Any,
) -> EigenResult:
    """Top ``num_eigenthings`` eigenpairs of the Hessian of ``loss(model(x), y)`` over ``dataloader``.

    Args:
        model: the network; left exactly as it was (see :class:`HVPOperator`).
        dataloader: iterable of ``(inputs, targets)`` batches.
        loss: ``loss(outputs, targets)`` returning the batch-mean loss as a scalar tensor.
        num_eigenthings: k, how many eigenpairs.
        full_dataset: Hessian of the mean loss over all samples (True), or one mini-batch per
            product (False, stochastic; only sensible with ``mode="power_iter"``).
        mode: "power_iter" (deflated power iteration), "lanczos" (ARPACK, on the host),
            "thick_restart" (native thick-restart Lanczos on the operator's device, fewer products
            than ARPACK), "block_lanczos" (native block Lanczos on batched products) or "auto"
            (thick_restart on a CPU, block_lanczos on a GPU).
        use_gpu: compute on CUDA when available (see :class:`HVPOperator`).
        fp16: products under autocast, at lower accuracy (see :class:`HVPOperator`).
        max_possible_gpu_samples: micro-batch size bound for the products.
        **kwargs: every keyword option of :class:`HVPOperator` (``params``, ``eval_mode``,
            ``reduction``, ``batch_size_fn``, ``precision``, ...) goes to the operator;
            everything else to the solver, e.g. ``which="LA"``, ``tol=1e-6``, ``momentum=0.5``,
            ``power_iter_steps=100``, ``max_steps``, ``num_lanczos_vectors``, ``block_size``,
            ``init_vecs``, ``verbose=False``.

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvals, eigenvecs)``: numpy arrays of shape
        (k,) and (k, n), most extreme first in the sense of ``which`` (default "LM").
    """
    if mode not in SOLVER_MODES:
        raise ValueError(f"mode={mode!r} is not known; choose one of {', '.join(map(repr, SOLVER_MODES))}.")
    runner, solver = SOLVER_MODES[mode]
    accepted = [name for name in inspect.signature(solver).parameters if name not in _FIXED_SOLVER_ARGS]
    unknown = [name for name in kwargs if name not in accepted and name not in _OPERATOR_KWARGS]
    if unknown:
        raise TypeError(
            f"compute_hessian_eigenthings got unknown keyword argument(s) {', '.join(unknown)} for "
            f"mode={mode!r}. Solver options: {', '.join(accepted)}; operator options: "
            f"{', '.join(_OPERATOR_KWARGS)}."
        )
    operator_kwargs = {name: kwargs.pop(name) for name in _OPERATOR_KWARGS if name in kwargs}
    operator = HVPOperator(
        model,
        dataloader,
        loss,
        use_gpu=use_gpu,
        fp16=fp16,
        full_dataset=full_dataset,
        max_possible_gpu_samples=max_possible_gpu_samples,
        **operator_kwargs,
    )
    return runner(operator, num_eigenthings, **kwargs)
