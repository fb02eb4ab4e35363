"""Power iteration: deflated, optionally momentum-accelerated, for any symmetric operator.

The momentum variant is the accelerated power method of Xu, He, De Sa, Mitliagkas & Re (2018),
"Accelerated stochastic power iteration": ``x_{t+1} = A x_t - beta x_{t-1}``. Both iterates are
divided by the same norm each step, so the recurrence is unchanged by the normalisation; the
eigenvalue reported is the Rayleigh quotient of ``A`` itself (never ``lambda - beta``). A good ``beta`` is
``lambda_2**2 / 4`` (the square of the next eigenvalue below the wanted one, over four); it cuts the
steps needed roughly from ``1 / gap`` to ``1 / sqrt(gap)``. Too large a ``beta`` (above
``lambda_1**2 / 4``) stalls it. ``momentum=None`` (the default) chooses beta automatically.

Deflation projects the found eigenvectors out of every iterate, so later eigenpairs are
searched in the orthogonal complement. "LA"/"SA" are reached by shifting: the operator is first
solved for its largest-magnitude eigenvalue ``rho`` (taken as ``||A v||`` of that solve's unit vector,
which is never below ``|v^T A v|`` and stays near ``rho`` even where the solve has not converged);
then ``A + rho I`` (LA) or ``rho I - A`` (SA) is positive semi-definite and its top eigenpairs are
the wanted ones. The shift solve's vector counts as a found eigenpair only if it converged. A final
Rayleigh-Ritz step over all found vectors (k extra products) refines the pairs and makes the vectors
orthonormal.

The default cap is :data:`DEFAULT_MAX_STEPS` products per eigenpair, and every solve stops as soon
as the residual meets the tolerance, so the cap only bounds a solve that cannot converge. Memory:
the k found vectors, kept as the rows of one (k, n) tensor, and k more for the Rayleigh-Ritz step,
which rotates in place (about 2k + 10 vectors in all, see :mod:`.memory`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, runs_frozen
from ..utils import private_generator
from .contract import Setup, check_in, finish, pick
from .inplace import orthonormalize_rows_, right_multiply_
from .momentum import AdaptiveMomentum, LastTwoIterates
from .memory import check_fixed_memory, power_memory
from .result import EigenResult, order_by_which, random_vectors

#: Products per eigenpair when no cap is given. Plain power iteration needs about
#: ln(1 / tol) / relative gap products; 1000 covers a relative gap of 1% at tol 1e-4 (and far
#: smaller gaps with momentum), while a solve that converges stops long before it.
DEFAULT_MAX_STEPS = 1000


@runs_frozen
def power_iteration(
    operator: Union[Operator, Tensor, np.ndarray],
    steps: Optional[int] = None,
    error_threshold: Optional[float] = None,
    momentum: Optional[float] = None,
    use_gpu: bool = True,
    fp16: bool = False,
    init_vec: Optional[Union[Tensor, np.ndarray]] = None,
    *,
    which: str = "LM",
    max_steps: Optional[int] = None,
    tol: Optional[float] = None,
    init_vecs: Optional[Union[Tensor, np.ndarray]] = None,
    seed: Optional[int] = 0,
    verbose: bool = True,
    to_numpy: bool = False,
    max_basis_bytes: Optional[int] = None,
    check_multiplicity: bool = True,
) -> EigenResult:
    """The dominant eigenpair of a symmetric operator by (momentum) power iteration.

    Args:
        operator: an :class:`Operator` or a dense symmetric (n, n) matrix.
        steps: the historical name of ``max_steps``.
        error_threshold: the historical name of ``tol``.
        momentum: ``beta`` of the accelerated iteration ``x_{t+1} = A x_t - beta x_{t-1}``; 0.0 is
            plain power iteration; None (default) chooses it automatically.
        use_gpu: ignored; vectors live on the operator's device (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        init_vec: the historical name of ``init_vecs``.
        which: "LM" (largest magnitude, default), "LA" (largest) or "SA" (smallest algebraic).
        max_steps: most operator products (the LA/SA shift solve takes up to as many again);
            default :data:`DEFAULT_MAX_STEPS`. The solve stops as soon as ``tol`` is met.
        tol: stop when ``||A v - lambda v|| <= tol * |lambda|``; default 1e-4.
        init_vecs: start vector, (n,) or (m, n) rows of which the first is used; random (from
            ``seed``) when None.
        seed: seed of the private generator for random start vectors (None: fresh randomness).
        verbose: show a progress bar of products.
        to_numpy: return the eigenvector as a numpy array (n,) instead of a tensor.
        max_basis_bytes: refuse to start when the solve needs more memory than this.
        check_multiplicity: check the converged pair for a missed copy of a repeated eigenvalue.

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvalue: float, eigenvector (n,))`` (a tensor
        on the operator's device and dtype, or numpy with ``to_numpy=True``), with ``residuals``,
        ``converged`` and ``num_products``. Warns (ConvergenceWarning) when the residual tolerance
        was not met within ``max_steps``.
    """
    solver = "power_iteration"
    steps, steps_name = pick(solver, "max_steps", max_steps, "steps", steps)
    tol, tol_name = pick(solver, "tol", tol, "error_threshold", error_threshold)
    init, init_name = pick(solver, "init_vecs", init_vecs, "init_vec", init_vec)
    result = _power_solve(
        solver, operator, 1, which=which, steps=steps, steps_name=steps_name, tol=tol, tol_name=tol_name,
        momentum=momentum, init=init, init_name=init_name, seed=seed, verbose=verbose, to_numpy=to_numpy,
        fp16=fp16, max_basis_bytes=max_basis_bytes, check_multiplicity=check_multiplicity, allow_k_equal_n=True,
    )
    result.eigenvalues = float(result.eigenvalues[0])
    result.eigenvectors = result.eigenvectors[0]
    return result


@runs_frozen
def deflated_power_iteration(
    operator: Union[Operator, Tensor, np.ndarray],
    num_eigenthings: int = 10,
    power_iter_steps: Optional[int] = None,
    power_iter_err_threshold: Optional[float] = None,
    momentum: Optional[float] = None,
    use_gpu: bool = True,
    fp16: bool = False,
    to_numpy: bool = True,
    *,
    which: str = "LM",
    max_steps: Optional[int] = None,
    tol: Optional[float] = None,
    init_vecs: Optional[Union[Tensor, np.ndarray]] = None,
    init_vec: Optional[Union[Tensor, np.ndarray]] = None,
    seed: Optional[int] = 0,
    verbose: bool = True,
    max_basis_bytes: Optional[int] = None,
    check_multiplicity: bool = True,
) -> EigenResult:
    """The ``num_eigenthings`` most extreme eigenpairs by power iteration with deflation.

    Args:
        operator: an :class:`Operator` or a dense symmetric (n, n) matrix.
        num_eigenthings: k, the number of eigenpairs (1 <= k < n).
        power_iter_steps: the historical name of ``max_steps``.
        power_iter_err_threshold: the historical name of ``tol``.
        momentum: ``beta`` of the accelerated iteration (see the module docstring); 0.0 is plain;
            None (default) chooses it automatically.
        use_gpu: ignored; vectors live on the operator's device (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        to_numpy: return numpy arrays (True) or torch tensors on the operator's device.
        which: "LM" (default), "LA" or "SA".
        max_steps: most operator products per eigenpair; default :data:`DEFAULT_MAX_STEPS`. Each
            pair's search stops as soon as ``tol`` is met.
        tol: relative residual tolerance ``||A v - lambda v|| / |lambda|``; default 1e-4.
        init_vecs: warm start, (m, n) row vectors (e.g. last call's eigenvectors); row i starts
            the search for eigenpair i, random vectors fill in beyond m.
        init_vec: the historical name of ``init_vecs``.
        seed: seed of the private generator for random start vectors (None: fresh randomness).
        verbose: show a progress bar of products.
        max_basis_bytes: refuse to start when the solve needs more memory than this (power
            iteration's memory is fixed by k: see :func:`~hessian_eigenthings.solver_memory`).
        check_multiplicity: when every pair converged, check for missed copies of repeated eigenvalues.

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvalues (k,), eigenvectors (k, n))``, sorted
        most extreme first in the sense of ``which``, with ``residuals``, ``converged`` and
        ``num_products``. Warns (ConvergenceWarning) for pairs that did not meet the tolerance.
    """
    solver = "deflated_power_iteration"
    steps, steps_name = pick(solver, "max_steps", max_steps, "power_iter_steps", power_iter_steps)
    tol, tol_name = pick(solver, "tol", tol, "power_iter_err_threshold", power_iter_err_threshold)
    init, init_name = pick(solver, "init_vecs", init_vecs, "init_vec", init_vec)
    return _power_solve(
        solver, operator, num_eigenthings, which=which, steps=steps, steps_name=steps_name, tol=tol,
        tol_name=tol_name, momentum=momentum, init=init, init_name=init_name, seed=seed, verbose=verbose,
        to_numpy=to_numpy, fp16=fp16, max_basis_bytes=max_basis_bytes, check_multiplicity=check_multiplicity,
    )


def _check_momentum(momentum: Any) -> Optional[float]:
    if momentum is None:
        return None
    if isinstance(momentum, bool):
        raise TypeError(f"momentum must be a number >= 0 or None (automatic), got {momentum!r}.")
    try:
        value = float(momentum)
    except (TypeError, ValueError):
        raise TypeError(
            f"momentum must be a number >= 0 or None (automatic), got {momentum!r} of type {type(momentum).__name__}."
        ) from None
    if not 0 <= value < float("inf"):  # also refuses NaN, which would poison every iterate
        raise ValueError(
            f"momentum must be a finite number >= 0 (the beta of x_(t+1) = A x_t - beta x_(t-1)) or None "
            f"(automatic), got {momentum}."
        )
    return value


def _power_solve(
    solver: str, operator: Any, k: Any, *, which: Any, steps: Any, steps_name: str, tol: Any, tol_name: str,
    momentum: Any, init: Any, init_name: str, seed: Any, verbose: Any, to_numpy: Any, fp16: Any,
    max_basis_bytes: Any, check_multiplicity: Any, allow_k_equal_n: bool = False,
) -> EigenResult:
    """Shared body of both entry points: check in, search pair by pair, Rayleigh-Ritz, finish."""
    setup = check_in(
        solver, operator, k, which=which, tol=1e-4 if tol is None else tol, max_steps=steps, init_vecs=init,
        seed=seed, verbose=verbose, to_numpy=to_numpy, fp16=fp16, max_basis_bytes=max_basis_bytes,
        check_multiplicity=check_multiplicity, krylov=False, tol_name=tol_name, tol_example="1e-4",
        steps_name=steps_name, init_name=init_name, max_start_vectors=None, allow_k_equal_n=allow_k_equal_n,
    )
    momentum = _check_momentum(momentum)
    op = setup.op
    k, steps = setup.k, setup.max_steps or DEFAULT_MAX_STEPS
    check_fixed_memory(solver, power_memory(op.size, k, op.dtype.itemsize), setup.max_basis_bytes)
    op.bar.total = steps * (k + (setup.which != "LM")) + (k if k > 1 else 0)
    try:
        values, vectors, residuals = _search(setup, steps, momentum)
    except BaseException:
        op.close()  # on success, finish() closes it after its own products (the multiplicity check)
        raise
    return finish(setup, values, vectors, residuals, advice=_advice(setup, steps, momentum))


def _search(setup: Setup, steps: int, momentum: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """The k pairs: (values (k,), rows (k, n), residuals (k,)), in the view's scaled units."""
    op, k, which, tol = setup.op, setup.k, setup.which, setup.tol
    starts = setup.starts
    generator = private_generator(setup.seed)

    def random_start() -> Tensor:
        return torch.randn(op.size, generator=generator, dtype=op.dtype).to(op.device)

    def start_vector(i: int) -> Tensor:
        return starts[:, i] if starts is not None and i < starts.shape[1] else random_start()

    first_start = start_vector(0) if which == "LM" else (starts[:, 0] if starts is not None else random_start())
    if momentum:
        # beta is in units of lambda**2, and the products are scaled (see ProductView): fix the scale
        # with one product, so that beta can be scaled alike.
        op.apply(first_start / torch.linalg.vector_norm(first_start))
        momentum = momentum * op.scale**2
    found = torch.empty(k, op.size, dtype=op.dtype, device=op.device)  # the pairs found, as rows
    found_vals: list[Tensor] = []
    last_residual: Optional[Tensor] = None
    sign, shift = 1.0, 0.0
    scale = torch.zeros((), dtype=op.dtype, device=op.device)
    if which != "LM":
        # rho = |lambda_LM| makes A + rho I (or rho I - A) positive semi-definite.
        # A warm start usually holds the wanted end's top vector; it then serves both solves.
        lam, vec, res = _iterate(op, first_start, 1.0, 0.0, None, steps, tol, momentum, scale)
        # ||A v|| = sqrt(lam**2 + res**2) >= |lam|. Where the solve ran out of steps between two
        # eigenvalues of nearly equal magnitude and opposite sign, v mixes them and lam is far
        # below rho, while ||A v|| is already close to it; a shift too small would make the
        # shifted operator indefinite and lead the search to the wrong end of the spectrum.
        rho = torch.sqrt(lam * lam + res * res)
        scale = rho
        converged = float(res) <= max(tol * abs(float(lam)), 10 * torch.finfo(op.dtype).eps * float(rho))
        # Only a converged vector is an eigenvector that deflation may remove; a mixture would
        # take the wanted eigenvector's direction with it.
        if converged and (which == "LA") == bool(lam >= 0):
            found[0] = vec
            found_vals.append(lam)
            last_residual = res
        sign, shift = (1.0 if which == "LA" else -1.0), float(rho)
    while len(found_vals) < k:
        count = len(found_vals)
        basis = found[:count].T if count else None
        start = first_start if count == 0 and which == "LM" else start_vector(count)
        lam, vec, res = _iterate(op, start, sign, shift, basis, steps, tol, momentum, scale)
        scale = torch.maximum(scale, lam.abs())
        found[count] = vec
        found_vals.append(lam)
        last_residual = res
        op.bar.set_postfix(found=count + 1)
    if k == 1:
        return torch.stack(found_vals), found, last_residual.reshape(1)
    values, residuals = _rayleigh_ritz_(op, found, which)
    return values, found, residuals


def _advice(setup: Setup, steps: int, momentum: Optional[float]) -> str:
    steps_name, tol_name = setup.names["max_steps"], setup.names["tol"]
    if momentum is None:
        advice = f"Raise {steps_name} (now {steps}) or loosen {tol_name}."
    elif momentum > 0:
        # Too large a beta stalls the iteration instead of speeding it up.
        advice = (
            f"Raise {steps_name} (now {steps}), check that momentum (now {momentum:g}) is below lambda**2 / 4 "
            f"for every wanted eigenvalue (lambda_next**2 / 4 is best), or loosen {tol_name}."
        )
    else:
        advice = (
            f"Raise {steps_name} (now {steps}), add momentum (about lambda_next**2 / 4, or None for automatic), "
            f"or loosen {tol_name}."
        )
    if setup.op.is_stochastic:
        advice += (
            " The operator is stochastic (one mini-batch per product), so residuals cannot fall below the "
            "mini-batch noise: use full_dataset=True for converged eigenpairs."
        )
    else:
        advice += " A Krylov solver (thick_restart_lanczos) needs far fewer products for the same tolerance."
    return advice


def _iterate(
    op: Operator, x0: Tensor, sign: float, shift: float, basis: Optional[Tensor], steps: int, tol: float,
    momentum: Optional[float], scale: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Power iteration on ``P (sign * A + shift I) P`` with P the projector orthogonal to ``basis``.

    The steps are ``x_{t+1} = B x_t - beta x_{t-1}`` (normalised). With a number as ``momentum``,
    ``beta`` is that number (0: plain steps). With None, ``beta`` is estimated at every step by a
    Rayleigh-Ritz step on the last two iterates, which also offers their top Ritz vector as the
    answer once its residual meets the tolerance (see :mod:`~hessian_eigenthings.solvers.momentum`;
    plain steps on a stochastic operator). Stops when
    ``||P A x - lambda x|| <= max(tol |lambda|, 10 eps max(scale, |lambda|))`` (the automatic mode
    aims at ``tol / 2`` when ``basis`` is given) or after ``steps`` products.

    Returns (lambda, v, residual) where lambda = v^T A v and residual = ||P A v - lambda v||.
    """

    def project(v: Tensor) -> Tensor:
        return v if basis is None else v - basis @ (basis.T @ v)

    floor_factor = 10 * torch.finfo(op.dtype).eps
    # Automatic momentum needs a fixed operator: with a new mini-batch per product the two iterates'
    # products come from different matrices, so on a stochastic operator the steps stay plain.
    automatic = momentum is None and not op.is_stochastic
    # The automatic mode stops a deflated search at half the tolerance: its Ritz vectors stop just
    # below the target, and the final Rayleigh-Ritz of the caller mixes each pair with the coupling
    # to the pairs found before it, which can lift a residual sitting at the target just above it.
    target = tol / 2 if automatic and basis is not None else tol

    def converged(res_f: float, lam_f: float, scale_f: float) -> bool:
        return res_f <= max(target * abs(lam_f), floor_factor * max(scale_f, abs(lam_f)))

    x = project(x0)
    norm = torch.linalg.vector_norm(x)
    if float(norm) == 0:  # a start vector inside the found subspace: take any other direction
        # a fixed private seed keeps the global RNG untouched and every rank identical
        x = project(random_vectors(op, 1, seed=len(x0) + (0 if basis is None else basis.shape[1]))[:, 0])
        norm = torch.linalg.vector_norm(x)
    x = x / norm
    x_prev = torch.zeros_like(x)
    window = LastTwoIterates() if automatic else None
    estimator = AdaptiveMomentum(sign, shift, op.dtype) if automatic else None
    beta = 0.0 if momentum is None else float(momentum)
    ynorm_f = 1.0
    for step in range(steps):
        ax = project(op.apply(x))
        lam = torch.dot(x, ax)
        residual = ax - lam * x
        res = torch.linalg.vector_norm(residual)
        latest = window.step(x, ax, residual) if window is not None else None
        scalars = [lam, res, torch.as_tensor(scale, dtype=lam.dtype, device=lam.device)]
        host = torch.stack(scalars + ([] if latest is None else list(latest.scalars))).tolist()  # one read
        lam_f, res_f, scale_f = host[0], host[1], host[2]
        if converged(res_f, lam_f, scale_f):
            return lam, x, res
        if latest is not None:
            choice = window.ritz_choice(host[3:], lam_f, sign, shift)
            if choice is not None and converged(choice.estimated_residual, choice.value, scale_f):
                ritz_lam, ritz_vec, ritz_res = window.ritz_vector(latest, choice.coeffs)
                ritz_lam_f, ritz_res_f = torch.stack([ritz_lam, ritz_res]).tolist()
                if converged(ritz_res_f, ritz_lam_f, scale_f):
                    return ritz_lam, ritz_vec, ritz_res
        if step == steps - 1:
            break
        if estimator is None:
            y = project(sign * ax + shift * x - beta * x_prev)
        else:
            if latest is not None:
                beta = estimator.update(host[3:], lam_f, scale_f)
            # x_prev is the previous unit iterate; the recurrence needs it over the last step's norm
            y = project(sign * ax + shift * x - (beta / ynorm_f) * x_prev)
            window.remember(x, ax)
        ynorm = torch.linalg.vector_norm(y)
        ynorm_f = float(ynorm)
        if ynorm_f == 0:
            break
        x_prev = x / ynorm if estimator is None else x
        x = y / ynorm
    return lam, x, res


def _rayleigh_ritz_(op: Operator, rows: Tensor, which: str) -> tuple[Tensor, Tensor]:
    """Best eigenpairs of ``op`` within the span of ``rows`` (k, n), which are replaced in place by the
    Ritz vectors, ordered by ``which``. Returns (values (k,), residuals (k,)).

    k single products go into one (n, k) buffer (a block product would hold its result and our copy
    at once; next to the thousands of products of the search, batching them gains nothing), and every
    rotation is in place: about 2k vectors in all."""
    orthonormalize_rows_(rows)
    products = torch.empty(op.size, rows.shape[0], dtype=op.dtype, device=op.device)
    for j in range(rows.shape[0]):
        products[:, j] = op.apply(rows[j])
    projected = rows @ products
    values, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    order = order_by_which(values, which)
    values, rotation = values[order], rotation[:, order]
    right_multiply_(rows.T, rotation)
    right_multiply_(products, rotation)
    products.addcmul_(rows.T, values.unsqueeze(0), value=-1)  # A x - theta x, in place
    return values, torch.linalg.vector_norm(products, dim=0)
