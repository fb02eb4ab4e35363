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
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator, runs_frozen
from ..utils import check_positive_int
from .contract import check_in, finish
from .inplace import right_multiply_
from .memory import fit_basis, native_memory
from .result import EigenResult, converged_mask, order_by_which, random_vectors

# Between restarts the basis is checked when it has grown by this factor since the last check.
CHECK_GROWTH = 1.2
# Share of the non-wanted room of the basis kept as extra Ritz vectors at a restart.
KEEP_FRACTION = 0.3


@dataclass
class KrylovSchurOutcome:
    """The wanted Ritz pairs of the last checkpoint.

    Attributes:
        values: (k,) float64 Ritz values on the host, ordered as ``which`` says.
        vectors: (k, n) orthonormal Ritz vectors as rows, on the operator's device and dtype.
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


def largest_basis(block_size: int, size: int) -> int:
    """The most basis vectors a block of b allows in dimension n: n for single vectors, n - b for
    blocks. The residual block that leaves the basis must be orthogonal to it; with b > 1 and fewer
    than b dimensions left, its extra columns would be rounding noise that is not orthogonal to the
    basis, and a restart that kept them would corrupt it. (A single vector only meets this when the
    basis is the whole space, where every Ritz pair is exact and the solve ends.)"""
    return size if block_size == 1 else size - block_size


def default_basis_size(num_eigenthings: int, block_size: int, size: int) -> int:
    """The default most basis vectors: ``max(2k + 20, 40, k + 10b)`` rounded up to whole blocks,
    capped at :func:`largest_basis`. ARPACK's default basis for single vectors (measured best on
    planted and model Hessian spectra, with a 30% thick restart); a block needs about ten blocks of
    Krylov degree."""
    wanted = max(2 * num_eigenthings + 20, 40, num_eigenthings + 10 * block_size)
    return min(largest_basis(block_size, size), block_size * math.ceil(wanted / block_size))


#: The widest default block: batched products stop paying off beyond it.
MAX_DEFAULT_BLOCK = 8


def default_block_size(num_eigenthings: int, size: Optional[int] = None) -> int:
    """``min(max(k, 2), 8)``: a block as wide as the wanted pairs (so a cluster or a repeated
    eigenvalue among them is found), within the width where batched products still pay off; shrunk
    so that a block method fits the operator size n (k + 3b <= n: a basis of k + 2b and the next
    block), down to 1."""
    block = min(max(num_eigenthings, 2), MAX_DEFAULT_BLOCK)
    if size is not None and num_eigenthings + 3 * block > size:
        block = (size - num_eigenthings) // 3
        block = block if block >= 2 else 1
    return block


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
        bar: the progress bar, for the checkpoints' progress note (products move it themselves).
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
    del block  # the caller holds no other reference: one vector less for the whole solve
    scale = torch.zeros((), dtype=dtype, device=device)  # running estimate of ||A||
    m = b
    cycles = restarts = checks = 0
    next_check = min(basis_size, max(first_check or (k + 2 * b), b + 1))

    while True:
        cols = slice(m - b, m)
        prev = basis[:, :m]
        product = op.apply_block(basis[:, cols]) if b > 1 else op.apply(basis[:, m - 1]).unsqueeze(1)
        scale = torch.maximum(scale, torch.linalg.vector_norm(product, dim=0).max())
        # Rounding-level noise: gives an invariant subspace's noise block a fresh direction.
        nudge = torch.where(scale > 0, eps * scale, torch.ones_like(scale))
        noise = torch.randn(n, b, dtype=dtype, device=device, generator=generator)
        # the product may be the operator's own tensor: the first step is out of place, the rest in place
        resid = noise.mul_(nudge / math.sqrt(n)).add_(product)
        del product, noise
        coeffs = prev.T @ resid
        resid.addmm_(prev, coeffs, alpha=-1)
        again = prev.T @ resid
        resid.addmm_(prev, again, alpha=-1)
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
                # (k, n) rows straight from the basis: one new block of k, no transposed copy
                vectors = torch.mm(y[:, wanted].T.to(device=device, dtype=dtype), prev.T)
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
                right_multiply_(prev, rotation)  # basis[:, :kept] = prev @ rotation, in place
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
    operator: Any,
    num_eigenthings: Any,
    *,
    solver: str,
    which: Any,
    block_size: Any,
    max_steps: Any,
    tol: Any,
    num_lanczos_vectors: Any,
    init_vecs: Any,
    init_name: str,
    fp16: Any,
    to_numpy: Any,
    seed: Any,
    verbose: Any,
    max_basis_bytes: Any,
    check_multiplicity: Any,
) -> EigenResult:
    """Check in the arguments of a native solver, run :func:`krylov_schur`, and finish the result.

    See :func:`~hessian_eigenthings.solvers.thick_restart.thick_restart_lanczos` for the arguments;
    ``solver`` names the public function in messages; ``block_size=None`` is
    :func:`default_block_size`.
    """
    setup = check_in(
        solver, operator, num_eigenthings, which=which, tol=tol, max_steps=max_steps, init_vecs=init_vecs,
        seed=seed, verbose=verbose, to_numpy=to_numpy, fp16=fp16, max_basis_bytes=max_basis_bytes,
        check_multiplicity=check_multiplicity, krylov=True, init_name=init_name,
    )
    op, k = setup.op, setup.k
    n = op.size
    try:
        if block_size is None:
            b = default_block_size(k, n)
        else:
            b = check_positive_int(block_size, "block_size")
            if b > 1 and k + 3 * b > n:
                raise ValueError(
                    f"block_size={b} is too large for num_eigenthings={k} and the operator size n={n}: a block "
                    f"method needs num_eigenthings + 3 * block_size <= n (a basis of k + 2b vectors and room for "
                    f"the next block). Use a smaller block_size (or 1)."
                )
        max_steps = setup.max_steps or 100
        basis_size = _basis_size(setup, b, num_lanczos_vectors)
        keep = default_keep(k, basis_size, b)
        generator = torch.Generator(device=op.device)
        generator.manual_seed(setup.seed)  # the same on every rank: the seed is resolved once for all
        # NaN/Inf tests of the products wait for the checkpoints, which read the host anyway.
        with op.deferred_checks():
            outcome = krylov_schur(op, k, setup.which, start_block(setup.starts, random_vectors(op, b, setup.seed)),
                                   basis_size, keep, max_steps, setup.tol, generator, op.bar)
    except BaseException:
        op.close()  # on success, finish() closes it after its own products (the multiplicity check)
        raise
    advice = f"Raise max_steps (now {max_steps}) or num_lanczos_vectors (now {basis_size}), or loosen tol."
    info = {"block_size": b, "basis_size": basis_size, "keep": keep, "restarts": outcome.restarts,
            "checks": outcome.checks}
    return finish(setup, outcome.values, outcome.vectors, outcome.residuals, outcome.converged, advice=advice,
                  info=info)


def _basis_size(setup: Any, b: int, num_lanczos_vectors: Any) -> int:
    """The basis size: given, or the default, lowered to fit ``max_basis_bytes``."""
    k, op = setup.k, setup.op
    n = op.size
    smallest, largest = min(n, k + 2 * b), largest_basis(b, n)
    if num_lanczos_vectors is None:
        wanted = default_basis_size(k, b, n)
    else:
        wanted = check_positive_int(num_lanczos_vectors, "num_lanczos_vectors")
        if not smallest <= wanted <= largest:
            limit = f"the operator size n={n}" if b == 1 else f"n - block_size = {largest}"
            raise ValueError(
                f"num_lanczos_vectors={wanted} must be between num_eigenthings + 2 * block_size = "
                f"{k + 2 * b} (or n, if smaller) and {limit}; about 2 * num_eigenthings + 10 works well."
            )
    return fit_basis(
        setup.solver, wanted, smallest, num_lanczos_vectors is not None, setup.max_basis_bytes,
        lambda m: native_memory(n, k, b, m, op.dtype.itemsize, setup.solver),
    )
