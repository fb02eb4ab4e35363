"""The contract every eigensolver keeps: one check-in of its arguments, one finish of its result.

Every solver accepts the same core keywords (:data:`CORE_KEYWORDS`): ``which``, ``tol``,
``max_steps``, ``init_vecs``, ``seed``, ``verbose``, ``to_numpy``; and the common options
``max_basis_bytes`` and ``check_multiplicity``. Historical names stay accepted as aliases
(``init_vec``; ``steps`` / ``power_iter_steps`` for ``max_steps`` and ``error_threshold`` /
``power_iter_err_threshold`` for ``tol`` in power iteration); giving an alias and its new name
together is an error. ``use_gpu`` is accepted and ignored; ``fp16=True`` warns.

:func:`check_in` validates everything before the first product and returns a :class:`Setup`
whose ``op`` is the :class:`~.product_view.ProductView` every product goes through. :func:`finish`
orders the pairs by ``which``, decides convergence, runs the repeated-eigenvalue check, undoes the
view's scaling, warns about unconverged pairs and builds the :class:`~.result.EigenResult`, with
the same types from every solver:

* ``to_numpy=True``: eigenvalues a float64 numpy array (k,); eigenvectors a numpy array (k, n) in
  the operator's dtype (the products, and so the vectors, are only as accurate as that dtype).
* ``to_numpy=False``: eigenvalues a float64 tensor (k,) on the operator's device (on the CPU for a
  device without float64, such as MPS); eigenvectors a tensor (k, n) on the operator's device and
  dtype.
* residuals: float64 numpy (k,); converged: bool numpy (k,).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..operators.base import as_operator
from ..utils import (
    check_bool,
    check_num_eigenthings,
    check_positive_int,
    check_seed,
    check_which,
    logger,
    private_generator,
)
from .product_view import ProductView
from .result import EigenResult, check_init_vectors, compat_flags, converged_mask, order_by_which, warn_unconverged
from .verify import complete_multiplicities

#: The keywords every eigensolver accepts, with the same meaning.
CORE_KEYWORDS = frozenset({"which", "tol", "max_steps", "init_vecs", "seed", "verbose", "to_numpy"})
#: Core keywords plus the options every solver shares and the accepted historical ones.
COMMON_KEYWORDS = CORE_KEYWORDS | frozenset(
    {"max_basis_bytes", "check_multiplicity", "init_vec", "use_gpu", "fp16"}
)


def pick(solver: str, name: str, value: Any, alias: str, alias_value: Any) -> tuple[Any, str]:
    """The value of an option that also has a historical name, and the name the caller used.

    Both default to None; giving both is a TypeError (the same option twice).
    """
    if value is not None and alias_value is not None:
        raise TypeError(
            f"{solver} got both {alias}= and {name}=, which are the same option ({alias} is its older "
            f"name); give only {name}=."
        )
    if alias_value is not None:
        return alias_value, alias
    return value, name


def check_tol(tol: Any, name: str = "tol", example: str = "1e-6") -> float:
    """A relative residual tolerance: a finite number > 0, or a ValueError/TypeError naming ``name``."""
    if isinstance(tol, bool) or not isinstance(tol, (numbers.Real, np.floating, np.integer)):
        raise TypeError(
            f"{name} must be a positive number such as {example}, got {tol!r} of type {type(tol).__name__}."
        )
    value = float(tol)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{name} must be a positive number such as {example} (a relative residual "
            f"||A v - lambda v|| / |lambda|, finite and > 0), got {tol!r}."
        )
    return value


def resolve_seed(seed: Any) -> int:
    """``seed`` as an int; None draws a fresh one, the same on every rank under torch.distributed
    (rank 0's, broadcast once), so that every random choice of a solve agrees across ranks."""
    if seed is not None:
        return check_seed(seed)
    generator = private_generator(None)  # broadcasts rank 0's fresh seed
    return int(torch.randint(0, 2**62, (1,), generator=generator))


@dataclass
class Setup:
    """A checked solve: what :func:`check_in` returns and :func:`finish` needs.

    Attributes:
        solver: the public name of the solver, for messages.
        op: the view every product goes through (counts, checks, scales).
        k: the number of eigenpairs.
        which: "LM", "LA" or "SA".
        tol: the relative residual tolerance.
        max_steps: the solver's cap (its meaning is the solver's), or None for its default.
        seed: the seed of every random choice (resolved, the same on every rank).
        to_numpy: the result's types (see the module docstring).
        starts: warm-start vectors as (n, m) columns on the operator's device, or None.
        max_basis_bytes: the memory cap, or None.
        check_multiplicity: run the repeated-eigenvalue check when every pair converged.
        names: the names the caller used for ``max_steps`` and ``tol`` (for advice in messages).
    """

    solver: str
    op: ProductView
    k: int
    which: str
    tol: float
    max_steps: Optional[int]
    seed: int
    to_numpy: bool
    starts: Optional[Tensor]
    max_basis_bytes: Optional[int]
    check_multiplicity: bool
    names: dict


def check_in(
    solver: str,
    operator: Any,
    num_eigenthings: Any,
    *,
    which: Any,
    tol: Any,
    max_steps: Any,
    init_vecs: Any,
    seed: Any,
    verbose: Any,
    to_numpy: Any,
    fp16: Any,
    max_basis_bytes: Any,
    check_multiplicity: Any,
    krylov: bool,
    tol_name: str = "tol",
    tol_example: str = "1e-6",
    steps_name: str = "max_steps",
    init_name: str = "init_vecs",
    max_start_vectors: Optional[int] = None,
    allow_k_equal_n: bool = False,
) -> Setup:
    """Validate a solver's arguments, in one place and before any product, and open its product view.

    Args:
        solver: the public name of the solver, for messages.
        operator: an Operator or a dense symmetric matrix.
        num_eigenthings: k (1 <= k < n; k <= n where ``allow_k_equal_n``).
        krylov: the solver builds a Krylov basis, which needs the same matrix in every product:
            a stochastic operator is refused.
        max_start_vectors: how many warm-start rows are kept (default: all).
        the rest: the solver's arguments and the names they go by in messages.

    Returns:
        A :class:`Setup`.
    """
    op = as_operator(operator)
    if allow_k_equal_n:
        k = check_positive_int(num_eigenthings, "num_eigenthings")
    else:
        k = check_num_eigenthings(num_eigenthings, op.size)
    which = check_which(which)
    tol = check_tol(tol, tol_name, tol_example)
    if max_steps is not None:
        max_steps = check_positive_int(max_steps, steps_name)
    if seed is not None:
        seed = check_seed(seed)
    verbose = check_bool(verbose, "verbose")
    to_numpy = check_bool(to_numpy, "to_numpy")
    check_multiplicity = check_bool(check_multiplicity, "check_multiplicity")
    if max_basis_bytes is not None:
        max_basis_bytes = check_positive_int(max_basis_bytes, "max_basis_bytes")
    starts = check_init_vectors(init_vecs, op, max_start_vectors or op.size, init_name)
    if krylov and op.is_stochastic:
        raise ValueError(
            f"{solver} needs a fixed operator, but this one is stochastic (each product may use a different "
            f"mini-batch, e.g. HVPOperator(..., full_dataset=False)). A Krylov method combines many products "
            f"as if they were with one matrix, and would return wrong eigenvalues that look converged. Use "
            f"power iteration (mode=\"power_iter\" in compute_hessian_eigenthings, or deflated_power_iteration), "
            f"or a fixed operator (full_dataset=True, or a dataloader of just the batches you want)."
        )
    compat_flags(solver, bool(fp16))
    seed = resolve_seed(seed)
    return Setup(
        solver=solver, op=ProductView(op, solver, verbose), k=k, which=which, tol=tol,
        max_steps=max_steps, seed=seed, to_numpy=to_numpy, starts=starts, max_basis_bytes=max_basis_bytes,
        check_multiplicity=check_multiplicity, names={"max_steps": steps_name, "tol": tol_name},
    )


def finish(
    setup: Setup,
    values: Tensor,
    vectors: Tensor,
    residuals: Tensor,
    converged: Optional[Tensor] = None,
    *,
    advice: str,
    info: Optional[dict] = None,
) -> EigenResult:
    """Package a solver's pairs: the shared end of every solve.

    Args:
        setup: from :func:`check_in`.
        values: (k,) eigenvalue estimates in the view's scaled units, any dtype and device.
        vectors: (k, n) unit eigenvectors as rows, on the operator's device and dtype.
        residuals: (k,) ``||A v - lambda v||`` in the view's scaled units.
        converged: (k,) flags, when the solver decides them itself; default
            :func:`~.result.converged_mask` of the residuals.
        advice: what to change when a pair did not converge (for the ConvergenceWarning).
        info: solver details for ``EigenResult.info``.

    Returns:
        The :class:`EigenResult` (types as in the module docstring), ordered by ``which``.
    """
    view = setup.op
    dtype, device = view.dtype, view.device
    values = values.detach().to("cpu", torch.float64)
    residuals = residuals.detach().to("cpu", torch.float64)
    order = order_by_which(values, setup.which)
    values, residuals = values[order], residuals[order]
    if not bool((order == torch.arange(len(order))).all()):
        vectors = vectors[order.to(vectors.device)]
    if converged is None:
        converged = converged_mask(residuals, values, setup.tol, dtype)
    else:
        converged = converged.detach().cpu().to(torch.bool)[order]
    info = dict(info or {})
    if setup.check_multiplicity and bool(converged.all()) and _check_can_change_the_answer(setup):
        completion = complete_multiplicities(
            view, values.to(device=device, dtype=dtype), vectors.T, setup.which, setup.tol, setup.seed
        )
        info["multiplicity_check"] = {"products": completion.num_products, "missed": completion.missed,
                                      "miss_probability": completion.miss_probability}
        if completion.missed:
            # the check returned other pairs: theirs replace the solver's
            values = completion.values.detach().to("cpu", torch.float64)
            residuals = completion.residuals.detach().to("cpu", torch.float64)
            vectors = completion.vectors.T.contiguous()
            order = order_by_which(values, setup.which)
            values, residuals, vectors = values[order], residuals[order], vectors[order.to(vectors.device)]
            converged = converged_mask(residuals, values, setup.tol, dtype)
    view.close()
    scale = view.scale
    values, residuals = values / scale, residuals / scale  # exact: the scale is a power of two
    warn_unconverged(setup.solver, values.tolist(), residuals.tolist(), converged.tolist(), setup.tol, advice)
    logger.info("%s: %d eigenpairs with %d products.", setup.solver, setup.k, view.num_products)
    vectors = vectors.detach()
    if setup.to_numpy:
        out_values: Any = values.numpy()
        out_vectors: Any = vectors.cpu().numpy()
    else:
        out_values = values.to(device if _has_float64(device) else "cpu")
        out_vectors = vectors
    return EigenResult(
        out_values, out_vectors, residuals.numpy(), converged.numpy(), view.num_products, setup.which,
        setup.tol, info=info,
    )


def _check_can_change_the_answer(setup: Setup) -> bool:
    """Whether the repeated-eigenvalue check is worth its products. A repeated eigenvalue among the
    wanted ones is the deterministic blind spot of a single start vector, so with k >= 2 the check
    always runs. With k = 1 the answer is the single most extreme eigenvalue, whatever its
    multiplicity, and a random start reaches it except with a probability of the order of its
    component along the top eigenvector being below the converged residual (negligible); only a
    given start vector (a warm start, which may lie orthogonal to the top eigenvector) can hide it."""
    return setup.k >= 2 or setup.starts is not None


def _has_float64(device: torch.device) -> bool:
    return device.type != "mps"


def zero_pairs(setup: Setup) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenpairs of an operator that is exactly zero: values 0, orthonormal vectors (the warm start
    first, then seeded random directions), residuals 0; as (values (k,), rows (k, n), residuals (k,))."""
    op = setup.op
    generator = private_generator(setup.seed)
    columns = torch.randn(op.size, setup.k, generator=generator, dtype=op.dtype).to(op.device)
    if setup.starts is not None:
        used = min(setup.k, setup.starts.shape[1])
        columns[:, :used] = setup.starts[:, :used]
    rows = torch.linalg.qr(columns)[0].T.contiguous()
    zeros = torch.zeros(setup.k, dtype=torch.float64)
    return zeros, rows, zeros.clone()

