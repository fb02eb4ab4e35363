"""The one-call entry point: top eigenpairs of a model's loss Hessian over a dataloader."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

from torch import Tensor, nn

from .operators.hvp import HVPOperator
from .operators.options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES, operator_options
from .solvers.registry import check_keywords, get_solver, solver_names
from .solvers.result import EigenResult

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
    mode: str = "auto",
    use_gpu: bool = True,
    fp16: bool = False,
    max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
    **kwargs: Any,
) -> EigenResult:
    """Top ``num_eigenthings`` eigenpairs of the Hessian of ``loss(model(x), y)`` over ``dataloader``.

    Args:
        model: the network; left exactly as it was (see :class:`HVPOperator`).
        dataloader: iterable of ``(inputs, targets)`` batches.
        loss: ``loss(outputs, targets)`` returning the batch-mean loss as a scalar tensor.
        num_eigenthings: k, how many eigenpairs.
        full_dataset: Hessian of the mean loss over all samples (True), or one mini-batch per
            product (False: a stochastic operator, which only ``mode="power_iter"`` accepts).
        mode: "auto" (default): thick-restart Lanczos, switching to block Lanczos where the
            operator's measured block products are several times cheaper per vector (see
            ``result.info["auto"]`` and :func:`~hessian_eigenthings.solvers.auto.auto_eigensolve`);
            block Lanczos when ``block_size`` is given; power iteration when given one of its own options
            (``momentum``, ``power_iter_steps``, ``power_iter_err_threshold``). Or a solver by
            name: "thick_restart", "block_lanczos" (batched products; finds eigenvalues repeated
            up to ``block_size`` times), "lanczos" (ARPACK, on the host in float64) or
            "power_iter" (deflated power iteration; the one mode for ``full_dataset=False``).
        use_gpu: compute on CUDA when available (see :class:`HVPOperator`).
        fp16: products under autocast, at lower accuracy (see :class:`HVPOperator`).
        max_possible_gpu_samples: micro-batch size bound for the products.
        **kwargs: every keyword option of :class:`HVPOperator` (``params``, ``eval_mode``,
            ``reduction``, ``batch_size_fn``, ``precision``, ...) goes to the operator;
            everything else to the solver: the options every solver takes
            (``which="LA"``, ``tol``, ``max_steps``, ``init_vecs``, ``seed``, ``verbose``,
            ``max_basis_bytes``, ``check_multiplicity``) and the mode's own
            (``num_lanczos_vectors``, ``block_size``, ``momentum``, ``power_iter_steps``, ...).

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvals, eigenvecs)``: numpy arrays of shape
        (k,) (float64) and (k, n), most extreme first in the sense of ``which`` (default "LM").
    """
    entry = get_solver(mode)
    solver_kwargs = {name: value for name, value in kwargs.items() if name not in _OPERATOR_KWARGS}
    fixed = [name for name in solver_kwargs if name in _FIXED_SOLVER_ARGS]
    if fixed:
        raise TypeError(
            f"compute_hessian_eigenthings sets {', '.join(fixed)} itself (use_gpu and fp16 are its own arguments, "
            f"for the operator; results are always numpy arrays)."
        )
    check_keywords(entry, solver_kwargs, _OPERATOR_KWARGS, where="compute_hessian_eigenthings")
    operator_kwargs = {name: kwargs[name] for name in _OPERATOR_KWARGS if name in kwargs}
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
    return entry.run(operator, num_eigenthings, to_numpy=True, **solver_kwargs)


class _SolverModes(Mapping):
    """``mode name -> (runner(operator, k, **keywords), solver function)``, read from the solver
    registry (``hessian_eigenthings.solvers.registry``); kept for code that used this table."""

    def __getitem__(self, name: str) -> tuple[Callable[..., EigenResult], Any]:
        if name not in solver_names():
            raise KeyError(name)
        entry = get_solver(name)
        return entry.run, entry.function

    def __iter__(self) -> Iterator[str]:
        return iter(solver_names())

    def __len__(self) -> int:
        return len(solver_names())


#: The modes of :func:`compute_hessian_eigenthings`; the registry is the source (this is a view of it).
SOLVER_MODES: Mapping[str, tuple[Callable[..., EigenResult], Any]] = _SolverModes()
