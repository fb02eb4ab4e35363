"""The methods of :func:`hessian_diagonal` and the routing of its arguments to the backpropagated ones.

* "hutchinson" (the default): stochastic, from Hessian-vector products, with standard errors.
* "exact": n Hessian-vector products with unit vectors (small models).
* "xdiag": XDiag, exchangeable and far more accurate than Hutchinson for the same products.
* "hesscale": HesScale's layer-by-layer approximation, about one gradient's cost (nn.Sequential).
* "ggn_exact": the exact GGN diagonal, one backward pass per model output of a sample.
* "ggn_mc": the one-draw Monte-Carlo GGN diagonal, one backward pass per draw (``mc_samples``).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ..utils import check_bool
from .diagonal import DiagonalEstimate
from .ggn_diagonal import ggn_diagonal
from .hesscale import hesscale_diagonal

HESSIAN_DIAGONAL_METHODS = ("hutchinson", "exact", "xdiag", "hesscale", "ggn_exact", "ggn_mc")
BACKPROP_METHODS = ("hesscale", "ggn_exact", "ggn_mc")

_COMMON_OPTIONS = ("params", "eval_mode", "device", "verbose")
_OPTIONS = {
    "hesscale": _COMMON_OPTIONS,
    "ggn_exact": _COMMON_OPTIONS,
    "ggn_mc": _COMMON_OPTIONS + ("mc_samples", "seed"),
}


def resolve_method(method: Any, exact: Any) -> str:
    """The diagonal method asked for by ``method`` and the older ``exact`` flag (an alias of "exact")."""
    exact = check_bool(exact, "exact")
    if method is None:
        return "exact" if exact else "hutchinson"
    if method not in HESSIAN_DIAGONAL_METHODS:
        raise ValueError(
            f"hessian_diagonal: method={method!r} is not known; choose one of "
            f"{', '.join(map(repr, HESSIAN_DIAGONAL_METHODS))}."
        )
    if exact and method != "exact":
        raise ValueError(
            f"hessian_diagonal: exact=True is the same as method='exact', which contradicts method={method!r}."
        )
    return method


def backprop_method(
    method: str,
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    full_dataset: bool,
    use_gpu: bool,
    fp16: bool,
    max_possible_gpu_samples: int,
    curvature: str,
    kwargs: dict,
) -> DiagonalEstimate:
    """Run one of :data:`BACKPROP_METHODS` with the arguments of :func:`hessian_diagonal`."""
    unknown = [name for name in kwargs if name not in _OPTIONS[method]]
    if unknown:
        raise TypeError(
            f"hessian_diagonal(method={method!r}) got unknown or meaningless keyword argument(s) {', '.join(unknown)}; "
            f"it takes {', '.join(_OPTIONS[method])} (and max_possible_gpu_samples, use_gpu)."
        )
    if full_dataset is not True:
        raise ValueError(
            f"hessian_diagonal(method={method!r}) reads the whole dataloader once; leave full_dataset=True (pass a "
            f"dataloader of the batches you want, e.g. [(x, y)] for one mini-batch)."
        )
    if fp16:
        raise ValueError(f"hessian_diagonal(method={method!r}) does not support fp16; leave fp16=False.")
    if method == "hesscale":
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"method='hesscale' approximates the 'hessian' or 'ggn' diagonal, not {curvature!r}.")
        return hesscale_diagonal(model, dataloader, loss, curvature=curvature, use_gpu=use_gpu,
                                 max_possible_gpu_samples=max_possible_gpu_samples, **kwargs)
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"method={method!r} computes the GGN diagonal; curvature={curvature!r} contradicts it.")
    if method == "ggn_mc":
        kwargs = {"mc_samples": 1, **kwargs}
    elif "mc_samples" in kwargs:
        raise TypeError("mc_samples belongs to method='ggn_mc'.")
    return ggn_diagonal(model, dataloader, loss, use_gpu=use_gpu, max_possible_gpu_samples=max_possible_gpu_samples,
                        **kwargs)
