"""One-call helpers, in the style of ``compute_hessian_eigenthings``: trace, spectral density and
diagonal of a model's loss Hessian (or its GGN / empirical Fisher) over a dataloader.

Each builds the curvature operator and hands it to the generic estimator; keyword arguments go
to the operator (every keyword option of its class, see
:func:`~hessian_eigenthings.operators.options.operator_options`) or to the estimator, and an
unknown one is a TypeError that lists both.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from ..operators.ggn import EmpiricalFisherOperator, GGNOperator
from ..operators.hvp import HVPOperator
from ..operators.model_operator import ModelOperator
from ..operators.pch import PCHOperator
from ..operators.options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES, check_operator_options, split_options
from .density import SpectralDensity, spectral_density
from .diagonal import DiagonalEstimate, exact_diagonal, hutchinson_diagonal
from .exchangeable import xdiag
from .trace import TRACE_METHODS, TraceEstimate

CURVATURES: dict[str, type] = {
    "hessian": HVPOperator,
    "ggn": GGNOperator,
    "fisher": EmpiricalFisherOperator,
    "pch": PCHOperator,
}


def curvature_operator(
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    curvature: str = "hessian",
    full_dataset: bool = True,
    use_gpu: bool = True,
    fp16: bool = False,
    max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
    **operator_kwargs: Any,
) -> ModelOperator:
    """The operator of ``curvature``: "hessian" (:class:`HVPOperator`), "ggn" (:class:`GGNOperator`)
    or "fisher" (:class:`EmpiricalFisherOperator`), with the usual operator arguments."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r} is not known; choose one of {', '.join(map(repr, CURVATURES))}.")
    check_operator_options("curvature_operator", CURVATURES[curvature], operator_kwargs)
    return CURVATURES[curvature](
        model, dataloader, loss, use_gpu=use_gpu, fp16=fp16, full_dataset=full_dataset,
        max_possible_gpu_samples=max_possible_gpu_samples, **operator_kwargs,
    )


def _split_kwargs(caller: str, estimator: Callable[..., Any], curvature: str, kwargs: dict) -> tuple[dict, dict]:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r} is not known; choose one of {', '.join(map(repr, CURVATURES))}.")
    return split_options(caller, kwargs, CURVATURES[curvature], estimator)


def hessian_trace(
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    method: Optional[str] = None,
    full_dataset: bool = True,
    use_gpu: bool = True,
    fp16: bool = False,
    max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
    curvature: str = "hessian",
    **kwargs: Any,
) -> TraceEstimate:
    """Trace of the Hessian of ``loss(model(x), y)`` over ``dataloader``, with its standard error.

    Args:
        model, dataloader, loss, full_dataset, use_gpu, fp16, max_possible_gpu_samples: as in
            :func:`compute_hessian_eigenthings`. With ``full_dataset=False`` every (block) product
            uses the next mini-batch, and the estimate is of the expected mini-batch Hessian.
        method: "hutch++" or "hutchinson". Default: "hutch++" on the full dataset, "hutchinson"
            with ``full_dataset=False`` (Hutch++ needs a deterministic operator).
        curvature: "hessian" (default), "ggn" or "fisher".
        **kwargs: to the operator (any of its keyword options: ``params``, ``eval_mode``,
            ``reduction``, ``batch_size_fn``, ...; see :class:`HVPOperator`) or to the estimator
            (``max_products``, ``tol``, ``rtol``, ``distribution``, ``seed``, ``verbose``, ...;
            see :func:`hutchpp_trace`).

    Returns:
        A :class:`TraceEstimate` (``.estimate``, ``.std_error``, ``.num_products``).
    """
    if method is None:
        method = "hutch++" if full_dataset else "hutchinson"
    if method not in TRACE_METHODS:
        raise ValueError(f"method={method!r} is not known; choose one of {', '.join(map(repr, TRACE_METHODS))}.")
    estimator = TRACE_METHODS[method]
    op_kwargs, est_kwargs = _split_kwargs("hessian_trace", estimator, curvature, kwargs)
    op = curvature_operator(model, dataloader, loss, curvature, full_dataset, use_gpu, fp16,
                            max_possible_gpu_samples, **op_kwargs)
    return estimator(op, **est_kwargs)


def hessian_density(
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    num_probes: int = 10,
    num_steps: int = 80,
    use_gpu: bool = True,
    fp16: bool = False,
    max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
    curvature: str = "hessian",
    **kwargs: Any,
) -> SpectralDensity:
    """Spectral density of the Hessian of ``loss(model(x), y)`` over the whole ``dataloader``, by SLQ.

    Args:
        model, dataloader, loss, use_gpu, fp16, max_possible_gpu_samples: as in
            :func:`compute_hessian_eigenthings` (always the full dataset: Lanczos needs a fixed
            operator).
        num_probes, num_steps: SLQ start vectors and Lanczos steps each (see :func:`spectral_density`).
        curvature: "hessian" (default), "ggn" or "fisher".
        **kwargs: to the operator (any of its keyword options, see :class:`HVPOperator`) or to
            :func:`spectral_density` (``sigma``, ``grid``, ``grid_size``, ``seed``, ``verbose``, ...).

    Returns:
        A :class:`SpectralDensity`; ``.plot(path)`` draws it.
    """
    if "full_dataset" in kwargs:
        raise TypeError(
            "hessian_density always uses the whole dataset (Lanczos needs the same operator at every step), so "
            "it takes no full_dataset argument; pass a smaller dataloader to use less data."
        )
    op_kwargs, est_kwargs = _split_kwargs("hessian_density", spectral_density, curvature, kwargs)
    op = curvature_operator(model, dataloader, loss, curvature, True, use_gpu, fp16,
                            max_possible_gpu_samples, **op_kwargs)
    return spectral_density(op, num_probes=num_probes, num_steps=num_steps, **est_kwargs)


def hessian_diagonal(
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    exact: bool = False,
    full_dataset: bool = True,
    use_gpu: bool = True,
    fp16: bool = False,
    max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
    curvature: str = "hessian",
    method: Optional[str] = None,
    **kwargs: Any,
) -> DiagonalEstimate:
    """Diagonal of the Hessian of ``loss(model(x), y)`` over ``dataloader``.

    Args:
        method: how to compute it:

            * "hutchinson" (default): Hutchinson's stochastic estimate with per-entry standard
              errors from Hessian-vector products (:func:`hutchinson_diagonal`);
            * "exact": the exact diagonal from n products (:func:`exact_diagonal`, for small models
              or a ``params=`` block; full dataset only);
            * "xdiag": XDiag (:func:`xdiag`), exchangeable, much more accurate than Hutchinson for
              the same products on Hessians (full dataset only);
            * "hesscale": HesScale's layer-by-layer approximation at about one gradient's cost, for
              an ``nn.Sequential`` of supported layers (:func:`hesscale_diagonal`; with
              ``curvature="ggn"`` the GGN variant); ``std_error`` is NaN (not a statistical error);
            * "ggn_exact": the exact GGN diagonal, one backward pass per model output of a sample
              (:func:`ggn_diagonal`);
            * "ggn_mc": its unbiased Monte-Carlo estimate, one backward pass per draw
              (``mc_samples``, default 1; ``seed``).
        exact: True is the same as ``method="exact"`` (kept for compatibility).
        model, dataloader, loss, full_dataset, use_gpu, fp16, max_possible_gpu_samples: as in
            :func:`compute_hessian_eigenthings`. The backpropagated methods read the whole dataset.
        curvature: "hessian" (default), "ggn" or "fisher" (the GGN methods imply "ggn").
        **kwargs: to the operator (any of its keyword options, see :class:`HVPOperator`) or to the
            estimator (``max_products``, ``tol``, ``rtol``, ``seed``, ``block_size``, ``verbose``,
            ...); the backpropagated methods take ``params``, ``eval_mode``, ``device``,
            ``verbose`` (and ``mc_samples``, ``seed``).

    Returns:
        A :class:`DiagonalEstimate`; ``info["by_parameter"]`` holds the diagonal split into
        tensors shaped like the parameters, by name.
    """
    from .diagonal_methods import BACKPROP_METHODS, backprop_method, resolve_method

    method = resolve_method(method, exact)
    if method in BACKPROP_METHODS:
        return backprop_method(method, model, dataloader, loss, full_dataset, use_gpu, fp16,
                               max_possible_gpu_samples, curvature, kwargs)
    estimator = {"exact": exact_diagonal, "xdiag": xdiag, "hutchinson": hutchinson_diagonal}[method]
    op_kwargs, est_kwargs = _split_kwargs("hessian_diagonal", estimator, curvature, kwargs)
    if method != "hutchinson" and not full_dataset:
        raise ValueError(f"hessian_diagonal(method={method!r}) needs the whole dataset: leave full_dataset=True.")
    op = curvature_operator(model, dataloader, loss, curvature, full_dataset, use_gpu, fp16,
                            max_possible_gpu_samples, **op_kwargs)
    result = estimator(op, **est_kwargs)
    result.info["by_parameter"] = op.unflatten(result.diagonal)
    return result
