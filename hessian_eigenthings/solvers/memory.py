"""What a solve costs in memory, before it starts, and the basis that fits a budget.

Every solver's own memory is a number of vectors of length n (the operator's size): its basis plus
a few working vectors. The models below count them for each solver (measured peaks of
``benchmarks/solver_memory.py`` agree within a few vectors); the operator's own memory for a
product (a model's activations and graphs) comes on top and is not counted.

* ``thick_restart`` / ``block_lanczos``: the basis (``num_lanczos_vectors`` vectors, on the
  operator's device and dtype), the k Ritz vectors of the result, and a few blocks of b working
  vectors. Restarts rotate the basis in place.
* ``lanczos`` (ARPACK): ARPACK's basis of ``ncv`` float64 vectors and its work space (4 more) on
  the host, plus two copies of the eigenvectors it returns (2k float64) and, on the operator's
  device, the k result vectors and the vectors of one product.
* ``power_iter``: the k eigenvectors found so far, their k products for the final Rayleigh-Ritz
  step, and the vectors of one power step.

``max_basis_bytes`` caps this memory: the Krylov solvers use fewer basis vectors (more restarts);
when even the smallest basis does not fit, or for power iteration (whose memory is fixed by k), the
solve is refused before it starts, with the memory it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from ..operators.base import Operator, as_operator
from ..utils import check_num_eigenthings, check_positive_int

# Working vectors besides the basis and the result, measured (benchmarks/solver_memory.py): the
# native solvers hold a few copies of the current block (product, residual, the QR factors of a
# block); ARPACK's eigsh holds its work space (4 float64 vectors) and, while it extracts the
# eigenvectors, two copies of them (2k); power iteration holds the vectors of one step.
NATIVE_WORK_SINGLE = 3
NATIVE_WORK_PER_BLOCK_VECTOR = 4
NATIVE_WORK_FIXED = 3
POWER_WORK = 10
ARPACK_HOST_WORK_F64 = 4
ARPACK_DEVICE_WORK = 3


@dataclass(frozen=True)
class SolverMemory:
    """The memory a solve will take beyond the operator's own.

    Counted: everything the solve holds at its peak, its k result vectors included (they are formed
    while the basis is still there). Not counted: the copy of the result in host memory that
    ``to_numpy=True`` makes of a solve on a GPU (k vectors), which the caller keeps.

    Attributes:
        solver: the solver that would run (``"auto"`` resolved).
        basis_vectors: the size of its basis (Krylov vectors; for power iteration, k).
        device_bytes: peak bytes on the operator's device (in its dtype).
        host_bytes: peak bytes in host memory besides (ARPACK's float64 basis and work space). On a
            CPU operator both are the same memory.
    """

    solver: str
    basis_vectors: int
    device_bytes: int
    host_bytes: int

    @property
    def peak_bytes(self) -> int:
        """``device_bytes + host_bytes``: what ``max_basis_bytes`` bounds (an upper bound of the
        peak where both are the same memory)."""
        return self.device_bytes + self.host_bytes

    def __str__(self) -> str:
        return (f"{self.solver}: basis of {self.basis_vectors} vectors, {format_bytes(self.device_bytes)} on the "
                f"operator's device + {format_bytes(self.host_bytes)} on the host")


def format_bytes(count: float) -> str:
    """``1.5 GiB``-style text for a byte count."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def native_memory(n: int, k: int, block: int, basis: int, itemsize: int, solver: str = "thick_restart") -> SolverMemory:
    """Memory of :func:`~.krylov_schur.krylov_schur` with a basis of ``basis`` vectors."""
    work = NATIVE_WORK_SINGLE if block == 1 else NATIVE_WORK_PER_BLOCK_VECTOR * block
    vectors = basis + k + work + NATIVE_WORK_FIXED
    return SolverMemory(solver, basis, itemsize * (n * vectors + basis * basis), 0)


def arpack_memory(n: int, k: int, ncv: int, itemsize: int) -> SolverMemory:
    """Memory of ARPACK with ``ncv`` basis vectors (float64, host) for an operator of ``itemsize``."""
    host = 8 * n * (ncv + ARPACK_HOST_WORK_F64 + 2 * k)
    device = itemsize * n * (k + ARPACK_DEVICE_WORK)
    return SolverMemory("lanczos", ncv, device, host)


def power_memory(n: int, k: int, itemsize: int) -> SolverMemory:
    """Memory of deflated power iteration for k pairs."""
    return SolverMemory("power_iter", k, itemsize * n * (2 * k + POWER_WORK), 0)


def fit_basis(
    solver: str, wanted: int, smallest: int, given: bool, cap: Optional[int], memory_of: Any
) -> int:
    """The basis size to use: ``wanted``, or the largest size from ``smallest`` up that keeps
    ``memory_of(size).peak_bytes`` within ``cap``. Raises ValueError, naming the memory needed,
    when ``smallest`` does not fit or an explicitly ``given`` size does not."""
    if cap is None or memory_of(wanted).peak_bytes <= cap:
        return wanted
    need = memory_of(smallest if not given else wanted)
    if given or need.peak_bytes > cap:
        what = "the basis you asked for" if given else "even the smallest basis"
        raise ValueError(
            f"{solver} needs {format_bytes(need.peak_bytes)} for {what} ({need.basis_vectors} vectors: "
            f"{format_bytes(need.device_bytes)} on the operator's device, {format_bytes(need.host_bytes)} on the "
            f"host), more than max_basis_bytes={cap} ({format_bytes(cap)}). Raise max_basis_bytes, ask for fewer "
            f"eigenpairs{', drop num_lanczos_vectors' if given else ''}, or use a smaller block_size where there "
            f"is one."
        )
    low, high = smallest, wanted  # memory grows with the basis: bisect for the largest that fits
    while low < high:
        middle = (low + high + 1) // 2
        if memory_of(middle).peak_bytes <= cap:
            low = middle
        else:
            high = middle - 1
    return low


def check_fixed_memory(solver: str, need: SolverMemory, cap: Optional[int]) -> None:
    """Refuse a solve whose memory cannot shrink (power iteration) when it exceeds ``cap``."""
    if cap is not None and need.peak_bytes > cap:
        raise ValueError(
            f"{solver} needs {format_bytes(need.peak_bytes)} for {need.basis_vectors} eigenpairs "
            f"({format_bytes(need.device_bytes)} on the operator's device, {format_bytes(need.host_bytes)} on the "
            f"host), more than max_basis_bytes={cap} ({format_bytes(cap)}). Raise max_basis_bytes or ask for "
            f"fewer eigenpairs; its memory is fixed by their number."
        )


def native_plan(block: bool) -> Callable[..., SolverMemory]:
    """The memory model of ``thick_restart`` (``block=False``) or ``block_lanczos`` for the registry."""

    def plan(n: int, k: int, dtype: torch.dtype, device: torch.device, options: dict) -> SolverMemory:
        from .krylov_schur import default_basis_size, default_block_size

        solver = "block_lanczos" if block else "thick_restart"
        b = (options.get("block_size") or default_block_size(k, n)) if block else 1
        b = check_positive_int(b, "block_size")
        given = options.get("num_lanczos_vectors")
        wanted = check_positive_int(given, "num_lanczos_vectors") if given is not None else default_basis_size(k, b, n)
        itemsize = _itemsize(dtype)
        size = fit_basis(solver, wanted, min(n, k + 2 * b), given is not None, options.get("max_basis_bytes"),
                         lambda m: native_memory(n, k, b, m, itemsize, solver))
        return native_memory(n, k, b, size, itemsize, solver)

    return plan


def arpack_plan(n: int, k: int, dtype: torch.dtype, device: torch.device, options: dict) -> SolverMemory:
    """The memory model of ``lanczos`` (ARPACK) for the registry."""
    from .arpack import default_num_lanczos_vectors

    given = options.get("num_lanczos_vectors")
    if given is not None:
        wanted = check_positive_int(given, "num_lanczos_vectors")
    else:
        wanted = default_num_lanczos_vectors(k, n)
    itemsize = _itemsize(dtype)
    size = fit_basis("lanczos", wanted, min(n, k + 1), given is not None, options.get("max_basis_bytes"),
                     lambda m: arpack_memory(n, k, m, itemsize))
    return arpack_memory(n, k, size, itemsize)


def power_plan(n: int, k: int, dtype: torch.dtype, device: torch.device, options: dict) -> SolverMemory:
    """The memory model of ``power_iter`` for the registry."""
    need = power_memory(n, k, _itemsize(dtype))
    check_fixed_memory("power_iter", need, options.get("max_basis_bytes"))
    return need


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def solver_memory(
    operator: Union[Operator, int],
    num_eigenthings: int = 10,
    mode: str = "auto",
    *,
    dtype: torch.dtype = torch.float32,
    device: Any = "cpu",
    **options: Any,
) -> SolverMemory:
    """The memory a solve will take beyond the operator's own, before it starts.

    Args:
        operator: the operator or dense matrix (its size, dtype and device are used), or its size n (then give
            ``dtype`` and ``device``; for a model, n is its number of trainable parameters).
        num_eigenthings: k.
        mode: a mode of ``compute_hessian_eigenthings`` ("auto", "thick_restart", "block_lanczos",
            "lanczos", "power_iter").
        dtype, device: of the vectors, when ``operator`` is a size.
        **options: the solve's options that change its memory: ``block_size``,
            ``num_lanczos_vectors``, ``max_basis_bytes`` (others are accepted, as the mode accepts
            them, and do not matter).

    Returns:
        A :class:`SolverMemory`; the basis it reports is the one the solve would use (made smaller
        to fit ``max_basis_bytes``). Raises ValueError, as the solve would, when nothing fits.

    Example:
        >>> solver_memory(100_000_000, 10, dtype=torch.float32, device="cuda").device_bytes / 2**30
        20.86...
    """
    from .registry import check_keywords, get_solver

    if isinstance(operator, (Operator, torch.Tensor, np.ndarray)):
        operator = as_operator(operator)
        n, dtype, device = operator.size, operator.dtype, operator.device
    else:
        n, device = check_positive_int(operator, "operator size"), torch.device(device)
    k = check_num_eigenthings(num_eigenthings, n)
    if options.get("max_basis_bytes") is not None:
        options["max_basis_bytes"] = check_positive_int(options["max_basis_bytes"], "max_basis_bytes")
    entry = get_solver(mode)
    check_keywords(entry, options, where="solver_memory")
    solver = entry.resolve(options)
    if solver.memory is None:
        raise ValueError(f"mode={solver.name!r} has no memory model registered.")
    return solver.memory(n, k, dtype, device, options)
