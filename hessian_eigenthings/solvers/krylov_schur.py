"""The engine of the native solvers: thick-restart (block) Lanczos, kept on the operator's device.

A Krylov-Schur decomposition ``A V = V H + Q R E^T`` is grown block by block: ``V`` (n, m) is an
orthonormal basis on the operator's device, ``H = V^T A V`` the small projected matrix, and the
last block's residual ``Q R`` (Q (n, b) orthonormal, R (b, b)) is what leaves the subspace. Every new
block is the operator's product with the previous one, orthogonalised against the whole basis (two
passes of classical Gram-Schmidt, "twice is enough"); ``H`` is filled from those coefficients, so
after a restart it is not tridiagonal and nothing assumes it is.

When the basis is full the decomposition is compressed to the ``keep`` best Ritz vectors (a thick
restart in the sense of Wu & Simon, 2000; Stewart's Krylov-Schur, 2001): ``V[:, :l] = V Y_sel``,
``H = diag(theta_sel)`` coupled to the residual block ``Q`` by ``R Y_last,sel``. Block size 1 is
the classical thick-restart Lanczos; larger blocks use the operator's batched product and find
eigenvalues of multiplicity up to b.

Device discipline: nothing inside a step reads a value on the host. Breakdown (an invariant
subspace, where the new block is rounding noise) is handled without a test: a random block of
size ``eps * ||A||`` (the rounding level of the products) is added to every product, so the
orthogonalised block always has a fresh direction to point in, and its coupling to the basis stays
at the rounding level (while every product so far was exactly zero, the noise is kept out of H,
so a zero operator gives zeros). Blocks get a third orthogonalisation pass after their QR, because the
directions of a rank-deficient block come out of that QR amplified and not orthogonal to V. The
host sees the small matrices (H, R) only at checkpoints: when the basis is full (a restart), and
at a few sizes in between whose count grows with the logarithm of the basis size (so a pair
that converges early does not wait for the whole basis). The Ritz residual
``||A x - theta x|| = ||R y_last||`` comes from the decomposition and costs no product.

``krylov.lanczos_tridiagonal`` is not reused for the steps: it reads one scalar per step (its
breakdown test), grows from a single vector and cannot continue a restarted decomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, as_operator, runs_frozen
from ..utils import check_num_eigenthings, check_positive_int, check_which, logger, progress
from .result import (
    EigenResult,
    check_init_vectors,
    compat_flags,
    converged_mask,
    order_by_which,
    random_vectors,
    warn_unconverged,
)

# Between restarts the basis is checked when it has grown by this factor since the last check.
CHECK_GROWTH = 1.2
# Share of the non-wanted room of the basis kept as extra Ritz vectors at a restart.
KEEP_FRACTION = 0.3


@dataclass
class KrylovSchurOutcome:
    """The wanted Ritz pairs of the last checkpoint.

    Attributes:
        values: (k,) float64 Ritz values on the host, ordered as ``which`` says.
        vectors: (n, k) orthonormal Ritz vectors on the operator's device and dtype.
        residuals: (k,) float64 ``||A x - theta x||`` from the decomposition, on the host.
        converged: (k,) bool, on the host.
        restarts: how many times the basis was compressed.
        checks: how many checkpoints (host reads) there were.
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    converged: Tensor
    restarts: int
    checks: int


def default_basis_size(num_eigenthings: int, block_size: int, size: int) -> int:
    """The default most basis vectors: ``max(2k + 20, 40, k + 10b)`` rounded up to whole blocks,
    capped at n. ARPACK's default basis for single vectors (measured best on planted and model
    Hessian spectra, with a 30% thick restart); a block needs about ten blocks of Krylov degree."""
    wanted = max(2 * num_eigenthings + 20, 40, num_eigenthings + 10 * block_size)
    return min(size, block_size * math.ceil(wanted / block_size))


def default_keep(num_eigenthings: int, basis_size: int, block_size: int) -> int:
    """Ritz vectors kept at a restart: the k wanted ones and 30% of the remaining room (measured
    best between 10% and 70%), at least two blocks short of the basis so a cycle adds vectors."""
    keep = num_eigenthings + int(KEEP_FRACTION * (basis_size - num_eigenthings))
    return max(1, min(keep, basis_size - 2 * block_size))


def start_block(inits: Optional[Tensor], randoms: Tensor) -> Tensor:
    """The first block, (n, b): start vectors folded into b columns, random columns where none.

    ``inits`` (n, m) are warm-start vectors; vector i is added (unit-normalised) to column i mod b,
    so with b = 1 the start vector is their sum, whose Krylov space holds all of them as soon as
    they are near eigenvectors. ``randoms`` (n, b) fill the columns no warm-start vector reached.
    """
    block = randoms.clone()
    if inits is None:
        return block
    b = block.shape[1]
    units = inits / torch.linalg.vector_norm(inits, dim=0, keepdim=True)
    for j in range(min(b, units.shape[1])):
        block[:, j] = units[:, j::b].sum(dim=1)
    return block


def krylov_schur(
    op: Operator,
    num_eigenthings: int,
    which: str,
    block: Tensor,
    basis_size: int,
    keep: int,
    max_cycles: int,
    tol: float,
    generator: torch.Generator,
    bar: Any,
    first_check: Optional[int] = None,
) -> KrylovSchurOutcome:
    """Run thick-restart block Lanczos until the ``num_eigenthings`` wanted Ritz pairs converge.

    Args:
        op: symmetric operator; all vectors live on its device and dtype.
        num_eigenthings: k, the pairs wanted.
        which: "LM", "LA" or "SA".
        block: (n, b) start block (orthonormalised here); b is the block size.
        basis_size: the most basis vectors (at most n, at least k + 2b unless it is n).
        keep: Ritz vectors kept at a restart (k <= keep <= basis_size - b).
        max_cycles: the most times the basis is filled; the last fill does not restart.
        tol: the relative residual wanted, ``||A x - theta x|| <= tol * |theta|`` (with the
            rounding floor of :func:`converged_mask`).
        generator: private generator on the operator's device for the breakdown perturbation.
        bar: a progress bar, advanced by the number of products.
        first_check: basis size of the first checkpoint (default: k + 2b).

    Returns:
        A :class:`KrylovSchurOutcome` with the wanted pairs of the last checkpoint.
    """
    n, b = block.shape
    k = num_eigenthings
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    basis = torch.empty(n, basis_size, dtype=dtype, device=device)
    proj = torch.zeros(basis_size, basis_size, dtype=dtype, device=device)
    basis[:, :b] = torch.linalg.qr(block)[0]
    scale = torch.zeros((), dtype=dtype, device=device)  # running estimate of ||A||
    m = b
    cycles = restarts = checks = 0
    next_check = min(basis_size, max(first_check or (k + 2 * b), b + 1))

    while True:
        cols = slice(m - b, m)
        prev = basis[:, :m]
        product = op.apply_block(basis[:, cols]) if b > 1 else op.apply(basis[:, m - 1]).unsqueeze(1)
        bar.update(b)
        scale = torch.maximum(scale, torch.linalg.vector_norm(product, dim=0).max())
        # Rounding-level noise: gives an invariant subspace's noise block a fresh direction.
        nudge = torch.where(scale > 0, eps * scale, torch.ones_like(scale))
        noise = torch.randn(n, b, dtype=dtype, device=device, generator=generator)
        resid = product + noise * (nudge / math.sqrt(n))
        coeffs = prev.T @ resid
        resid = resid - prev @ coeffs
        again = prev.T @ resid
        resid = resid - prev @ again
        coeffs = coeffs + again
        if b == 1:
            norm = torch.linalg.vector_norm(resid)
            q, r = resid / norm, norm.reshape(1, 1)
        else:
            q, r = torch.linalg.qr(resid)
            third = prev.T @ q
            q, r2 = torch.linalg.qr(q - prev @ third)
            coeffs = coeffs + third @ r
            r = r2 @ r
        # While every product so far was exactly zero, the noise is all there is: keep it out of H.
        live = (scale > 0).to(dtype)
        proj[:m, cols] = coeffs * live
        r = r * live

        full = m + b > basis_size
        if full or m >= next_check:
            checks += 1
            op.flush_checks()
            cycles += full
            # The small matrices go to the host once; numpy's LAPACK is fast on them (torch's
            # threaded eigh is not, at this size).
            small = torch.cat([proj[:m, :m].reshape(-1), r.reshape(-1)]).to("cpu", torch.float64).numpy()
            h = small[: m * m].reshape(m, m)
            r_host = small[m * m :].reshape(b, b)
            theta_np, y_np = np.linalg.eigh((h + h.T) / 2)
            theta, y = torch.from_numpy(theta_np), torch.from_numpy(y_np)
            estimates = torch.from_numpy(np.linalg.norm(r_host @ y_np[m - b :, :], axis=0))
            order = order_by_which(theta, which)
            wanted = order[:k]
            converged = converged_mask(estimates[wanted], theta[wanted], tol, dtype)
            # Residuals at the rounding level of the products cannot shrink further, also where an
            # eigenvalue is near zero (the floor of converged_mask scales with the wanted values only).
            converged |= estimates[wanted] <= 10 * eps * float(theta.abs().max())
            done = int(converged.sum())
            bar.set_postfix(converged=f"{done}/{k}", basis=m)
            if done == k or (full and cycles >= max_cycles):
                vectors = prev @ y[:, wanted].to(device=device, dtype=dtype)
                return KrylovSchurOutcome(
                    theta[wanted], vectors, estimates[wanted], converged, restarts, checks
                )
            next_check = min(basis_size, max(m + b, math.ceil(m * CHECK_GROWTH)))
            if full:
                restarts += 1
                chosen = order[: min(keep, m)]
                kept = len(chosen)
                rotation = y[:, chosen].to(device=device, dtype=dtype)
                coupling = (torch.from_numpy(r_host) @ y[m - b :, chosen]).to(device=device, dtype=dtype)
                basis[:, :kept] = prev @ rotation
                basis[:, kept : kept + b] = q
                proj.zero_()
                proj[:kept, :kept] = torch.diag(theta[chosen].to(device=device, dtype=dtype))
                proj[kept : kept + b, :kept] = coupling
                m = kept + b
                next_check = min(basis_size, max(m + b, math.ceil(m * CHECK_GROWTH)))
                continue
        basis[:, m : m + b] = q
        proj[m : m + b, cols] = r
        m += b


@runs_frozen
def native_solve(
    operator: Union[Operator, Tensor, np.ndarray],
    num_eigenthings: int,
    which: str,
    block_size: int,
    max_steps: int,
    tol: float,
    num_lanczos_vectors: Optional[int],
    init_vecs: Any,
    fp16: bool,
    to_numpy: bool,
    seed: Optional[int],
    verbose: bool,
    solver: str,
) -> EigenResult:
    """Validate the arguments of a native solver, run :func:`krylov_schur`, and package the result.

    See :func:`~hessian_eigenthings.solvers.thick_restart.thick_restart_lanczos` for the arguments;
    ``solver`` names the public function in messages.
    """
    compat_flags(solver, fp16)
    op = as_operator(operator)
    n = op.size
    k = check_num_eigenthings(num_eigenthings, n)
    which = check_which(which)
    b = check_positive_int(block_size, "block_size")
    if b > 1 and k + 2 * b > n:
        raise ValueError(
            f"block_size={b} is too large for num_eigenthings={k} and the operator size n={n}: a block "
            f"method needs num_eigenthings + 2 * block_size <= n. Use a smaller block_size (or 1)."
        )
    max_steps = check_positive_int(max_steps, "max_steps")
    tol = float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be positive (a relative residual such as 1e-6), got {tol}.")
    smallest = min(n, k + 2 * b)
    if num_lanczos_vectors is None:
        basis_size = default_basis_size(k, b, n)
    else:
        basis_size = check_positive_int(num_lanczos_vectors, "num_lanczos_vectors")
        if not smallest <= basis_size <= n:
            raise ValueError(
                f"num_lanczos_vectors={basis_size} must be between num_eigenthings + 2 * block_size = "
                f"{k + 2 * b} (or n, if smaller) and the operator size n={n}; about 2 * num_eigenthings + 10 "
                f"works well."
            )
    keep = default_keep(k, basis_size, b)
    inits = check_init_vectors(init_vecs, op, n, "init_vecs")
    if op.is_stochastic:
        logger.warning(
            "%s on a stochastic operator: every product uses a different mini-batch, which a Krylov "
            "method does not expect, and the residuals cannot fall below the mini-batch noise. Use "
            "full_dataset=True.", solver,
        )
    generator = torch.Generator(device=op.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    block = start_block(inits, random_vectors(op, b, seed))

    first_products = op.num_products
    bar = progress(desc=solver, verbose=verbose, total=None)
    try:
        # NaN/Inf tests of the products wait for the checkpoints, which read the host anyway.
        with op.deferred_checks():
            outcome = krylov_schur(op, k, which, block, basis_size, keep, max_steps, tol, generator, bar)
    finally:
        bar.close()
    num_products = op.num_products - first_products

    residuals = outcome.residuals.numpy()
    converged = outcome.converged.numpy()
    advice = (
        f"Raise max_steps (now {max_steps}) or num_lanczos_vectors (now {basis_size}), or loosen tol."
    )
    if op.is_stochastic:
        advice += " The operator is stochastic: use full_dataset=True for converged eigenpairs."
    warn_unconverged(
        solver, outcome.values.tolist(), residuals.tolist(), converged.tolist(), tol, advice
    )
    logger.info(
        "%s: %d eigenpairs with %d products (block %d, basis %d, %d restarts, %d checks).",
        solver, k, num_products, b, basis_size, outcome.restarts, outcome.checks,
    )
    vectors = outcome.vectors.T.contiguous()
    if to_numpy:
        values: Any = outcome.values.numpy()
        vectors = vectors.cpu().numpy()
    else:
        values = outcome.values.to(device=op.device, dtype=op.dtype)
    info = {"block_size": b, "basis_size": basis_size, "keep": keep, "restarts": outcome.restarts,
            "checks": outcome.checks}
    return EigenResult(values, vectors, residuals, converged, num_products, which, tol, info=info)
