"""Power iteration: deflated, optionally momentum-accelerated, for any symmetric operator.

The momentum variant is the accelerated power method of De Sa et al. (2018):
``x_{t+1} = A x_t - beta x_{t-1}``. Both iterates are divided by the same norm each step, so the
recurrence is unchanged by the normalisation; the eigenvalue reported is the Rayleigh quotient of
``A`` itself (never ``lambda - beta``). A good ``beta`` is ``lambda_2**2 / 4`` (the square of the
next eigenvalue below the wanted one, over four); it cuts the steps needed roughly from
``1 / gap`` to ``1 / sqrt(gap)``. Too large a ``beta`` (above ``lambda_1**2 / 4``) stalls it.

Deflation projects the found eigenvectors out of every iterate, so later eigenpairs are
searched in the orthogonal complement. "LA"/"SA" are reached by shifting: the operator is first
solved for its largest-magnitude eigenvalue ``rho`` (taken as ``||A v||`` of that solve's unit vector,
which is never below ``|v^T A v|`` and stays near ``rho`` even where the solve has not converged);
then ``A + rho I`` (LA) or ``rho I - A`` (SA) is positive semi-definite and its top eigenpairs are
the wanted ones. The shift solve's vector counts as a found eigenpair only if it converged. A final Rayleigh-Ritz step
over all found vectors (k extra products) refines the pairs and makes the vectors orthonormal.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..utils import check_num_eigenthings, check_positive_int, check_which, logger, progress
from .momentum import AdaptiveMomentum, LastTwoIterates
from .result import (
    EigenResult,
    check_init_vectors,
    compat_flags,
    converged_mask,
    order_by_which,
    random_vectors,
    warn_unconverged,
)


@runs_frozen
def power_iteration(
    operator: Union[Operator, Tensor, np.ndarray],
    steps: int = 20,
    error_threshold: float = 1e-4,
    momentum: float = 0.0,
    use_gpu: bool = True,
    fp16: bool = False,
    init_vec: Optional[Union[Tensor, np.ndarray]] = None,
    *,
    which: str = "LM",
    seed: Optional[int] = 0,
    verbose: bool = True,
) -> EigenResult:
    """The dominant eigenpair of a symmetric operator by (momentum) power iteration.

    Args:
        operator: an :class:`Operator` or a dense symmetric (n, n) matrix.
        steps: most operator products per eigenpair (the LA/SA shift solve takes up to as many).
        error_threshold: stop when ``||A v - lambda v|| <= error_threshold * |lambda|``.
        momentum: ``beta`` of the accelerated iteration ``x_{t+1} = A x_t - beta x_{t-1}``; 0 is plain.
        use_gpu: ignored; vectors live on the operator's device (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        init_vec: start vector of shape (n,); random (from ``seed``) when None.
        which: "LM" (largest magnitude, default), "LA" (largest) or "SA" (smallest algebraic).
        seed: seed of the private generator for random start vectors (None: fresh randomness).
        verbose: show a progress bar.

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvalue: float, eigenvector: Tensor (n,))``,
        with ``residuals``, ``converged`` and ``num_products``. Warns (ConvergenceWarning) when the
        residual tolerance was not met within ``steps``.
    """
    result = _power_solve(
        as_operator(operator), 1, which, steps, error_threshold, momentum, init_vec, seed, verbose,
        fp16, solver="power_iteration", steps_name="steps", tol_name="error_threshold", allow_k_equal_n=True,
    )
    result.eigenvalues = float(result.eigenvalues[0])
    result.eigenvectors = result.eigenvectors[0]
    return result


@runs_frozen
def deflated_power_iteration(
    operator: Union[Operator, Tensor, np.ndarray],
    num_eigenthings: int = 10,
    power_iter_steps: int = 20,
    power_iter_err_threshold: float = 1e-4,
    momentum: float = 0.0,
    use_gpu: bool = True,
    fp16: bool = False,
    to_numpy: bool = True,
    *,
    which: str = "LM",
    init_vecs: Optional[Union[Tensor, np.ndarray]] = None,
    seed: Optional[int] = 0,
    verbose: bool = True,
) -> EigenResult:
    """The ``num_eigenthings`` most extreme eigenpairs by power iteration with deflation.

    Args:
        operator: an :class:`Operator` or a dense symmetric (n, n) matrix.
        num_eigenthings: k, the number of eigenpairs (1 <= k < n).
        power_iter_steps: most operator products per eigenpair.
        power_iter_err_threshold: relative residual tolerance ``||A v - lambda v|| / |lambda|``.
        momentum: ``beta`` of the accelerated iteration (see the module docstring); 0 is plain.
        use_gpu: ignored; vectors live on the operator's device (kept for compatibility).
        fp16: ignored with a warning; precision belongs to the operator (kept for compatibility).
        to_numpy: return numpy arrays (True) or torch tensors on the operator's device.
        which: "LM" (default), "LA" or "SA".
        init_vecs: warm start, (m, n) row vectors (e.g. last call's eigenvectors); row i starts
            the search for eigenpair i, random vectors fill in beyond m.
        seed: seed of the private generator for random start vectors (None: fresh randomness).
        verbose: show a progress bar.

    Returns:
        An :class:`EigenResult` that unpacks as ``(eigenvalues (k,), eigenvectors (k, n))``, sorted
        most extreme first in the sense of ``which``, with ``residuals``, ``converged`` and
        ``num_products``. Warns (ConvergenceWarning) for pairs that did not meet the tolerance.
    """
    result = _power_solve(
        as_operator(operator), num_eigenthings, which, power_iter_steps, power_iter_err_threshold, momentum,
        init_vecs, seed, verbose, fp16, solver="deflated_power_iteration", steps_name="power_iter_steps",
        tol_name="power_iter_err_threshold",
    )
    if to_numpy:
        result.eigenvalues = result.eigenvalues.cpu().numpy()
        result.eigenvectors = result.eigenvectors.cpu().numpy()
    return result


def _power_solve(
    op: Operator, k: int, which: str, steps: int, tol: float, momentum: float, init: Any,
    seed: Optional[int], verbose: bool, fp16: bool, *, solver: str, steps_name: str, tol_name: str,
    allow_k_equal_n: bool = False,
) -> EigenResult:
    """Shared body of both entry points; returns tensors, eigenvectors as rows (k, n)."""
    compat_flags(solver, fp16)
    k = check_positive_int(k, "num_eigenthings") if allow_k_equal_n else check_num_eigenthings(k, op.size)
    which = check_which(which)
    steps = check_positive_int(steps, steps_name)
    tol = float(tol)
    if not 0 < tol < float("inf"):
        raise ValueError(f"{tol_name} must be a positive number such as 1e-4, got {tol}.")
    if momentum is not None:  # None: chosen automatically at every step
        momentum = float(momentum)
        if not 0 <= momentum < float("inf"):  # also refuses NaN, which would poison every iterate
            raise ValueError(
                f"momentum must be a finite number >= 0 (the beta of x_(t+1) = A x_t - beta x_(t-1)), got {momentum}."
            )
    starts = check_init_vectors(init, op, k, "init_vec" if allow_k_equal_n else "init_vecs")
    randoms = random_vectors(op, k + 1, seed)

    def start_vector(i: int) -> Tensor:
        return starts[:, i] if starts is not None and i < starts.shape[1] else randoms[:, i]

    first_products = op.num_products
    found_vals: list[Tensor] = []
    found_vecs: list[Tensor] = []
    last_residual = None
    sign, shift = 1.0, 0.0
    bar = progress(total=steps * k, desc=solver, verbose=verbose)
    try:
        scale = torch.zeros((), dtype=op.dtype, device=op.device)
        if which != "LM":
            # rho = |lambda_LM| makes A + rho I (or rho I - A) positive semi-definite.
            # A warm start usually holds the wanted end's top vector; it then serves both solves.
            shift_start = starts[:, 0] if starts is not None else randoms[:, k]
            lam, vec, res = _iterate(op, shift_start, 1.0, 0.0, None, steps, tol, momentum, scale)
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
                found_vals.append(lam)
                found_vecs.append(vec)
                last_residual = res
            sign, shift = (1.0 if which == "LA" else -1.0), float(rho)
        while len(found_vecs) < k:
            basis = torch.stack(found_vecs, dim=1) if found_vecs else None
            lam, vec, res = _iterate(
                op, start_vector(len(found_vecs)), sign, shift, basis, steps, tol, momentum, scale
            )
            scale = torch.maximum(scale, lam.abs())
            found_vals.append(lam)
            found_vecs.append(vec)
            last_residual = res
            bar.set_postfix(found=len(found_vecs))
    finally:
        bar.close()

    vectors = torch.stack(found_vecs, dim=1)
    if k == 1:
        values, residuals = torch.stack(found_vals), last_residual.reshape(1)
    else:
        values, vectors, residuals = _rayleigh_ritz(op, vectors)
    order = order_by_which(values, which)
    values, vectors, residuals = values[order], vectors[:, order], residuals[order]
    converged = converged_mask(residuals, values, tol, op.dtype)

    values_list = values.tolist()
    residual_arr = residuals.double().cpu().numpy()
    converged_arr = converged.cpu().numpy()
    if momentum is not None and momentum > 0:
        # Too large a beta stalls the iteration instead of speeding it up.
        advice = (
            f"Raise {steps_name} (now {steps}), check that momentum (now {momentum:g}) is below lambda**2 / 4 "
            f"for every wanted eigenvalue (lambda_next**2 / 4 is best), or loosen {tol_name}."
        )
    else:
        advice = (
            f"Raise {steps_name} (now {steps}), add momentum (about lambda_next**2 / 4), or loosen {tol_name}."
        )
    if op.is_stochastic:
        advice += (
            " The operator is stochastic (one mini-batch per product), so residuals cannot fall below the "
            "mini-batch noise: use full_dataset=True for converged eigenpairs."
        )
    warn_unconverged(
        solver, values_list, residual_arr.tolist(), converged_arr.tolist(), tol, advice
    )
    num_products = op.num_products - first_products
    logger.info("%s: %d eigenpairs with %d products.", solver, k, num_products)
    return EigenResult(values, vectors.T.contiguous(), residual_arr, converged_arr, num_products, which, tol)


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


def _rayleigh_ritz(op: Operator, vectors: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Best eigenpairs of ``op`` within span(vectors): returns (values (k,), vectors (n, k), residuals (k,))."""
    q, _ = torch.linalg.qr(vectors)
    aq = op.apply_block(q)
    projected = q.T @ aq
    projected = (projected + projected.T) / 2
    values, rotation = torch.linalg.eigh(projected)
    ritz_vectors = q @ rotation
    a_ritz = aq @ rotation
    residuals = torch.linalg.vector_norm(a_ritz - ritz_vectors * values.unsqueeze(0), dim=0)
    return values, ritz_vectors, residuals
