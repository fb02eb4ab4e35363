"""Dense Hessians of small models, and all their eigenpairs.

* :func:`dense_matrix`: any operator as an (n, n) matrix, from n products in blocks.
* :func:`loss_hessian`: the Hessian of a model's mean loss over a dataloader, (n, n), with the
  same semantics as :class:`HVPOperator` (it is built from its products).
* :func:`output_hessian`: the Hessian of every output entry of a model w.r.t. its parameters,
  ``output.shape + (n, n)``, by forward-over-reverse differentiation (``torch.func``).
* :func:`split_by_parameter`: a matrix as blocks ``[name_a][name_b]`` shaped like the parameters.
* :func:`dense_eigenthings`: eigenpairs of a dense symmetric matrix (or a small operator) by
  ``torch.linalg.eigh`` in float64, as an :class:`EigenResult`.

Everything here needs memory quadratic in n; a call that would need more than
``max_memory_bytes`` stops before allocating and says how much it would need.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacfwd, jacrev

from ..data import move_to
from ..model_utils import ParamSpec, common_device, common_dtype, preserved_model_state, select_parameters, unflatten
from ..operators.base import Operator, as_operator, runs_frozen
from ..operators.hvp import HVPOperator
from ..operators.options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES, check_operator_options
from ..solvers.result import EigenResult, order_by_which
from ..utils import check_positive_int, check_which, logger, progress
from .probes import check_deterministic, unit_blocks

DEFAULT_MAX_MEMORY = 2 * 1024**3  # bytes


def _format_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"


def check_dense_memory(num_entries: int, dtype: torch.dtype, max_memory_bytes: Optional[float], what: str) -> None:
    """Raise a ValueError naming the memory ``num_entries`` numbers of ``dtype`` need, if above the limit."""
    if max_memory_bytes is None:
        return
    needed = num_entries * torch.empty((), dtype=dtype).element_size()
    if needed > max_memory_bytes:
        raise ValueError(
            f"{what} has {num_entries:,} entries and would need {_format_bytes(needed)} of memory in {dtype}, "
            f"above max_memory_bytes={_format_bytes(max_memory_bytes)}. Restrict it to a block of parameters "
            f"with params=[...], use the matrix-free tools (HVPOperator with lanczos, hutchpp_trace, "
            f"spectral_density), or raise max_memory_bytes if the memory is really there."
        )


@runs_frozen
def dense_matrix(
    operator: Union[Operator, Tensor, np.ndarray],
    *,
    block_size: int = 64,
    max_memory_bytes: Optional[float] = DEFAULT_MAX_MEMORY,
    verbose: bool = True,
) -> Tensor:
    """The operator as a dense (n, n) tensor: column j is ``A e_j``, from n products in blocks.

    Args:
        operator: an :class:`Operator` (deterministic) or a dense matrix (returned as a tensor).
        block_size: unit vectors per block product.
        max_memory_bytes: refuse (ValueError, naming the memory needed) when the (n, n) result
            would be larger; None for no limit.
        verbose: show a progress bar.

    Returns:
        (n, n) tensor on the operator's device, in its dtype. It is symmetric up to the rounding
        of the products; ``(A + A.T) / 2`` removes that.
    """
    op = as_operator(operator)
    block_size = check_positive_int(block_size, "block_size")
    check_deterministic(op, "dense_matrix")
    n = op.size
    check_dense_memory(n * n, op.dtype, max_memory_bytes, f"The dense {n} x {n} matrix")
    out = torch.empty(n, n, dtype=op.dtype, device=op.device)
    with progress(total=n, desc="dense matrix", verbose=verbose) as bar:
        for start, stop, units in unit_blocks(op, block_size):
            out[:, start:stop] = op.apply_block(units)
            bar.update(stop - start)
    return out


def split_by_parameter(
    matrix: Tensor, names: Sequence[str], shapes: Sequence[Sequence[int]]
) -> dict[str, dict[str, Tensor]]:
    """Split a (..., n, n) tensor into blocks ``blocks[name_a][name_b]`` of shape
    ``(..., *shape_a, *shape_b)``: the second derivatives w.r.t. parameter a and parameter b.

    ``names`` and ``shapes`` give the parameters in the order of the flat layout.
    """
    sizes = [int(np.prod(s, dtype=np.int64)) for s in shapes]
    if sum(sizes) != matrix.shape[-1] or matrix.shape[-1] != matrix.shape[-2]:
        raise ValueError(
            f"split_by_parameter: the parameters hold {sum(sizes)} numbers but the matrix is "
            f"{tuple(matrix.shape[-2:])}."
        )
    lead = tuple(matrix.shape[:-2])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    blocks: dict[str, dict[str, Tensor]] = {}
    for a, (name_a, shape_a) in enumerate(zip(names, shapes)):
        row = {}
        for b, (name_b, shape_b) in enumerate(zip(names, shapes)):
            piece = matrix[..., offsets[a] : offsets[a + 1], offsets[b] : offsets[b + 1]]
            row[name_b] = piece.reshape(*lead, *shape_a, *shape_b)
        blocks[name_a] = row
    return blocks


def loss_hessian(
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    *,
    params: ParamSpec = None,
    by_parameter: bool = False,
    use_gpu: bool = True,
    fp16: bool = False,
    max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
    eval_mode: bool = True,
    device: Any = None,
    check_finite: bool = True,
    max_memory_bytes: Optional[float] = DEFAULT_MAX_MEMORY,
    block_size: int = 64,
    verbose: bool = True,
    **operator_options: Any,
) -> Union[Tensor, dict[str, dict[str, Tensor]]]:
    """The Hessian of ``loss(model(x), y)``, averaged over every sample of ``dataloader``, as a matrix.

    Same meaning as :class:`HVPOperator` with ``full_dataset=True`` (batches weighted by their
    size, eval mode by default, the model left unchanged); built from n Hessian-vector products
    in blocks of ``block_size``, so memory beyond the result is ``n * block_size``.

    Args:
        model, dataloader, loss: as in :func:`compute_hessian_eigenthings`.
        params: a parameter block (names, name prefixes or tensors); default all trainable ones.
        by_parameter: return ``{name_a: {name_b: block}}`` with blocks shaped
            ``(*shape_a, *shape_b)`` instead of the (n, n) matrix.
        use_gpu, fp16, max_possible_gpu_samples, eval_mode, device, check_finite: as for
            :class:`HVPOperator`.
        max_memory_bytes: refuse (ValueError, naming the memory needed) above this; None: no limit.
        block_size: products per block.
        verbose: show a progress bar.
        **operator_options: any other keyword option of :class:`HVPOperator` (``reduction``,
            ``batch_size_fn``, ``precision``, ...).

    Returns:
        (n, n) tensor in the parameters' dtype on the compute device, or the blocks.
    """
    check_operator_options("loss_hessian", HVPOperator, operator_options)
    op = HVPOperator(
        model, dataloader, loss, use_gpu=use_gpu, fp16=fp16, full_dataset=True,
        max_possible_gpu_samples=max_possible_gpu_samples, params=params, eval_mode=eval_mode,
        device=device, check_finite=check_finite, **operator_options,
    )
    check_dense_memory(op.size * op.size, op.dtype, max_memory_bytes,
                       f"The loss Hessian of {op.size} parameters ({op.size} x {op.size})")
    matrix = dense_matrix(op, block_size=block_size, max_memory_bytes=None, verbose=verbose)
    if by_parameter:
        return split_by_parameter(matrix, op.param_names, [p.shape for p in op._params])
    return matrix


def _model_call_args(inputs: Any) -> tuple[tuple, dict]:
    """The (args, kwargs) of ``model(...)`` for inputs, as in :func:`hessian_eigenthings.data.call_model`."""
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return (inputs,), {}


def _output_leaves(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _output_leaves(item)]
    if isinstance(out, dict):
        return [leaf for item in out.values() for leaf in _output_leaves(item)]
    raise TypeError(
        f"output_hessian: the model returned a {type(out).__name__}; it must return a tensor or a "
        f"tuple/list/dict of tensors."
    )


def _map_leaves(fn: Callable[[Tensor], Any], out: Any) -> Any:
    if isinstance(out, Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map_leaves(fn, item) for item in out)
    return {key: _map_leaves(fn, item) for key, item in out.items()}


def output_hessian(
    model: nn.Module,
    inputs: Any,
    *,
    params: ParamSpec = None,
    by_parameter: bool = False,
    eval_mode: bool = True,
    max_memory_bytes: Optional[float] = DEFAULT_MAX_MEMORY,
) -> Any:
    """Second derivatives of every entry of ``model(inputs)`` w.r.t. the parameters.

    For an output of shape ``S`` the result has shape ``S + (n, n)``: ``H[s]`` is the Hessian of
    output entry ``s`` (e.g. ``H[i, k]`` for sample i, logit k). Computed as the Jacobian of the
    Jacobian (forward over reverse, ``torch.func``), on the parameters' device.

    Args:
        model: the network; left unchanged (values, buffers, grads, flags, modes).
        inputs: a tensor (``model(x)``), a tuple/list (``model(*inputs)``) or a dict
            (``model(**inputs)``); moved to the parameters' device.
        params: a parameter block; default all trainable parameters (the flat layout of
            :class:`HVPOperator`).
        by_parameter: per output, blocks ``{name_a: {name_b: (*S, *shape_a, *shape_b)}}``.
        eval_mode: evaluate in eval mode (default). With False, dropout uses one fixed mask
            (the global RNG is untouched) and BatchNorm in train mode is not supported.
        max_memory_bytes: refuse (ValueError, naming the memory needed) when the result would
            be larger; None: no limit.

    Returns:
        For a model returning a tensor: a tensor ``S + (n, n)``. For several outputs (a
        tuple/list/dict of tensors): the same structure with one such tensor per output.
    """
    names, chosen = select_parameters(model, params)
    dtype, device = common_dtype(chosen), common_device(chosen)
    inputs = move_to(inputs, device)
    args, kwargs = _model_call_args(inputs)
    n = sum(p.numel() for p in chosen)
    flat0 = torch.cat([p.detach().reshape(-1) for p in chosen])

    def outputs_of(flat: Tensor) -> Any:
        return functional_call(model, dict(zip(names, unflatten(flat, chosen))), args, kwargs)

    with preserved_model_state(model, eval_mode, restore_buffers=True), torch.random.fork_rng(
        devices=[device] if device.type == "cuda" else []
    ):
        torch.manual_seed(0)
        with torch.no_grad():
            sample = outputs_of(flat0)
        leaves = _output_leaves(sample)
        bad = [tuple(t.shape) for t in leaves if not t.dtype.is_floating_point]
        if bad:
            raise TypeError(f"output_hessian: the model returned non-floating outputs of shapes {bad}.")
        entries = sum(t.numel() for t in leaves) * n * n
        shapes = ", ".join(str(tuple(t.shape)) for t in leaves)
        check_dense_memory(entries, dtype, max_memory_bytes,
                           f"The output Hessian (outputs {shapes}, each entry x {n} x {n})")
        logger.info("output_hessian: %d output entries x %d x %d.", entries // (n * n), n, n)
        try:
            hess = jacfwd(jacrev(outputs_of), randomness="error" if eval_mode else "same")(flat0)
        except RuntimeError as exc:
            raise RuntimeError(
                f"output_hessian could not differentiate the model twice with torch.func ({exc}). Models "
                f"with BatchNorm in train mode or in-place updates of buffers need eval_mode=True."
            ) from exc
    hess = _map_leaves(lambda t: t.detach(), hess)
    if by_parameter:
        shapes_p = [p.shape for p in chosen]
        return _map_leaves(lambda t: split_by_parameter(t, names, shapes_p), hess)
    return hess


def dense_eigenthings(
    matrix: Union[Tensor, np.ndarray, Operator],
    num_eigenthings: Optional[int] = None,
    which: str = "LM",
    *,
    max_memory_bytes: Optional[float] = DEFAULT_MAX_MEMORY,
    verbose: bool = True,
) -> EigenResult:
    """Eigenpairs of a dense symmetric matrix (or of a small operator, formed densely first).

    The matrix is symmetrised (``(A + A^T) / 2``) and solved by ``torch.linalg.eigh`` in float64 on
    its device: exact to rounding, for every eigenpair at once.

    Args:
        matrix: (n, n) tensor or array, e.g. from :func:`loss_hessian`, or an :class:`Operator`.
        num_eigenthings: k, how many pairs; default all n.
        which: "LM", "LA" or "SA"; the order of the result, most extreme first.
        max_memory_bytes: for an operator, the limit passed to :func:`dense_matrix`.
        verbose: progress bar while an operator is formed.

    Returns:
        An :class:`EigenResult` unpacking as ``(eigenvalues (k,), eigenvectors (k, n))`` numpy arrays
        (float64), with residuals ``||A v - lambda v||`` measured on the float64 matrix.
    """
    which = check_which(which)
    products = 0
    if isinstance(matrix, Operator):
        products = matrix.size
        matrix = dense_matrix(matrix, max_memory_bytes=max_memory_bytes, verbose=verbose)
    elif isinstance(matrix, np.ndarray):
        matrix = torch.from_numpy(matrix)
    if not isinstance(matrix, Tensor):
        raise TypeError(f"dense_eigenthings expects a tensor, numpy array or Operator, got {type(matrix).__name__}.")
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"dense_eigenthings expects a square (n, n) matrix, got shape {tuple(matrix.shape)}.")
    n = matrix.shape[0]
    k = n if num_eigenthings is None else check_positive_int(num_eigenthings, "num_eigenthings")
    if k > n:
        raise ValueError(f"num_eigenthings={k} is larger than the matrix size n={n}.")
    a = matrix.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("dense_eigenthings: the matrix contains NaN or Inf entries.")
    a = (a + a.T) / 2
    vals, vecs = torch.linalg.eigh(a)
    order = order_by_which(vals, which)[:k]
    vals, vecs = vals[order], vecs[:, order]
    residuals = torch.linalg.vector_norm(a @ vecs - vecs * vals, dim=0)
    return EigenResult(
        vals.cpu().numpy(), np.ascontiguousarray(vecs.T.cpu().numpy()), residuals.cpu().numpy(),
        np.ones(k, dtype=bool), products, which, 0.0, info={"solver": "torch.linalg.eigh"},
    )
