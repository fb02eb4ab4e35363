"""The operator interface that every solver sees, and the two simplest operators.

An operator is a symmetric n x n linear map given only through its products. Subclasses
implement ``_matvec`` (and, where they can do better than a loop, ``_matmat``); the public
``apply`` / ``apply_block`` check the input once so that every operator reports a wrong vector
the same way, and count products so that solvers can report their cost.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from torch import Tensor

from ..utils import check_positive_int, logger, preserved_global_rng


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def runs_frozen(fn: _Fn) -> _Fn:
    """Decorate a solver or estimator whose first argument is ``operator``: when it is an
    :class:`Operator`, the whole call runs inside its :meth:`Operator.frozen` block; and torch's
    global random state is as before after the call, also when it raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        operator = args[0] if args else kwargs.get("operator")
        with preserved_global_rng():
            if isinstance(operator, Operator):
                with operator.frozen():
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class Operator:
    """A symmetric linear operator ``v -> A v`` on flat vectors of length ``size``.

    Attributes:
        size: n, the operator is n x n.
        dtype: floating dtype of the vectors it takes and returns.
        device: torch device of those vectors.
        num_products: operator-vector products done so far (a block of b vectors counts b).
        is_stochastic: True when two products with the same vector may differ (mini-batch HVPs).
    """

    is_stochastic: bool = False

    def __init__(self, size: int, dtype: torch.dtype = torch.float32, device: Any = "cpu") -> None:
        self.size = check_positive_int(size, "size")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch dtype such as torch.float32, got {dtype!r}.")
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_products = 0

    # -- what subclasses provide -------------------------------------------------------------
    def _matvec(self, vec: Tensor) -> Tensor:
        """Product with one checked vector, shape (n,) -> (n,)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _matvec")

    def _matmat(self, mat: Tensor) -> Tensor:
        """Product with a checked block, shape (n, b) -> (n, b). Default: one _matvec per column."""
        columns = []
        for j in range(mat.shape[1]):
            column = self._matvec(mat[:, j])
            self._check_output(column, mat[:, j], "_matvec")
            columns.append(column)
        return torch.stack(columns, dim=1)

    # -- public interface ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(n, n)."""
        return (self.size, self.size)

    def apply(self, vec: Tensor) -> Tensor:
        """Return ``A @ vec`` for a vector of shape (n,) with the operator's dtype and device."""
        self._check_input(vec, ndim=1)
        out = self._matvec(vec)
        self._check_output(out, vec, "_matvec")
        self.num_products += 1
        return out

    def apply_block(self, mat: Tensor) -> Tensor:
        """Return ``A @ mat`` for a block of b column vectors, shape (n, b) -> (n, b)."""
        self._check_input(mat, ndim=2)
        if mat.shape[1] == 0:
            return mat.clone()
        out = self._matmat(mat)
        self._check_output(out, mat, "_matmat")
        self.num_products += mat.shape[1]
        return out

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Within this block the caller promises that the operator does not change (for a model
        operator: the model's parameters, buffers and modes, and its data), so that work shared by
        every product may be kept between products and freed at the block's end. Every solver and
        estimator of this package runs inside it; wrap your own loop of products in it for the
        same speed. Default: no-op."""
        yield

    @contextlib.contextmanager
    def deferred_checks(self) -> Iterator[None]:
        """Within this block, checks that would read a device value on the host after every product
        (such as NaN/Inf tests) may be postponed to :meth:`flush_checks` or the end of the block.
        Solvers that keep vectors on a GPU use it to avoid one sync per product. Default: no-op."""
        yield

    def flush_checks(self) -> None:
        """Run the checks postponed by :meth:`deferred_checks` (raising as they would have)."""

    def __matmul__(self, other: Tensor) -> Tensor:
        """``op @ v`` for a (n,) vector (:meth:`apply`) or ``op @ V`` for a (n, b) block (:meth:`apply_block`)."""
        if isinstance(other, Tensor) and other.dim() == 2:
            return self.apply_block(other)
        return self.apply(other)

    def __call__(self, vec: Tensor) -> Tensor:
        """``op(v)`` is ``op @ v``."""
        return self @ vec

    def to_scipy(self) -> "scipy.sparse.linalg.LinearOperator":  # noqa: F821
        """This operator as a scipy ``LinearOperator`` taking and returning float64 numpy arrays.

        The dtype is declared up front, so scipy never spends a product to probe it. Vectors are
        moved to the operator's device and dtype for each product and back to host float64.
        """
        from scipy.sparse.linalg import LinearOperator

        if self.is_stochastic:
            logger.warning(
                "to_scipy() on a stochastic operator: every product uses a different mini-batch, "
                "which Krylov solvers such as ARPACK do not expect. Use full_dataset=True."
            )

        def matvec(x: np.ndarray) -> np.ndarray:
            vec = torch.as_tensor(np.ascontiguousarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.apply(vec).detach().to("cpu", torch.float64).numpy()

        def matmat(x: np.ndarray) -> np.ndarray:
            mat = torch.as_tensor(np.ascontiguousarray(x), dtype=self.dtype, device=self.device)
            return self.apply_block(mat).detach().to("cpu", torch.float64).numpy()

        return LinearOperator(
            shape=self.shape, matvec=matvec, rmatvec=matvec, matmat=matmat, dtype=np.float64
        )

    def _check_input(self, vec: Any, ndim: int) -> None:
        kind = "vector of shape (n,)" if ndim == 1 else "block of shape (n, b)"
        name = "apply" if ndim == 1 else "apply_block"
        if not isinstance(vec, Tensor):
            raise TypeError(
                f"{type(self).__name__}.{name} expects a torch.Tensor {kind} with n={self.size}, got "
                f"{type(vec).__name__}; convert with torch.as_tensor(x, dtype={self.dtype}, device='{self.device}')."
            )
        if vec.dim() != ndim or vec.shape[0] != self.size:
            raise ValueError(
                f"{type(self).__name__}.{name} expects a {kind} with n={self.size}, got shape {tuple(vec.shape)}."
            )
        if vec.dtype != self.dtype:
            raise TypeError(
                f"{type(self).__name__}.{name} got a {vec.dtype} tensor but the operator works in {self.dtype}; "
                f"convert with vec.to({self.dtype})."
            )
        if vec.device != self.device and not _same_device(vec.device, self.device):
            raise ValueError(
                f"{type(self).__name__}.{name} got a tensor on {vec.device} but the operator lives on "
                f"{self.device}; move it with vec.to('{self.device}')."
            )

    def _check_output(self, out: Any, given: Tensor, method: str) -> None:
        """Raise if a product is not a tensor of the input's shape in the operator's dtype and on its
        device (what every solver relies on); reads only metadata, so it costs no device sync."""
        if (
            isinstance(out, Tensor) and out.shape == given.shape and out.dtype == self.dtype
            and (out.device == self.device or _same_device(out.device, self.device))
        ):
            return
        got = (
            f"a {out.dtype} tensor of shape {tuple(out.shape)} on {out.device}" if isinstance(out, Tensor)
            else f"a {type(out).__name__}"
        )
        raise TypeError(
            f"{type(self).__name__}.{method} returned {got} for an input of shape {tuple(given.shape)}; an "
            f"operator must return a tensor of the input's shape in its dtype ({self.dtype}) on its device "
            f"({self.device}). Fix {type(self).__name__}.{method}, or convert its result with "
            f".to(dtype={self.dtype}, device='{self.device}')."
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, dtype={self.dtype}, device={self.device})"

    # -- arithmetic: the results are operators of operators/algebra.py ------------------------------
    __array_ufunc__ = None  # so that numpy scalars leave ``np.float64(2) * op`` to the operator

    def __mul__(self, factor: Any) -> "Operator":
        """``op * a``: the operator scaled by a number."""
        if isinstance(factor, Operator):
            raise TypeError(
                "The product of two operators is not symmetric in general, so it is not an Operator here; "
                "multiply operators by numbers, and apply them to vectors with op @ v."
            )
        from .algebra import scale

        return scale(self, factor)

    def __rmul__(self, factor: Any) -> "Operator":
        """``a * op``."""
        return self.__mul__(factor)

    def __truediv__(self, divisor: Any) -> "Operator":
        """``op / a``."""
        from .algebra import divide

        return divide(self, divisor)

    def __add__(self, other: Any) -> "Operator":
        """``op + op2`` (same size, dtype and device), or ``op + c``: the shift ``A + c I``."""
        from .algebra import add

        return add(self, other)

    def __radd__(self, other: Any) -> "Operator":
        """``c + op``."""
        return self.__add__(other)

    def __sub__(self, other: Any) -> "Operator":
        """``op - op2``, or ``op - c``: the shift ``A - c I``."""
        from .algebra import add

        return add(self, other, sign=-1.0)

    def __rsub__(self, other: Any) -> "Operator":
        """``c - op``: ``c I - A``."""
        from .algebra import subtract_from

        return subtract_from(self, other)

    def __neg__(self) -> "Operator":
        """``-op``."""
        from .algebra import scale

        return scale(self, -1.0)


class WrappingOperator(Operator):
    """An operator made of other operators (``parts``, all of ``size``, in the first one's dtype and
    device): passes their kept-work and deferred-check blocks through, and is stochastic when any part is."""

    def __init__(self, parts: Sequence[Operator], size: int) -> None:
        super().__init__(size, parts[0].dtype, parts[0].device)
        self._parts = list(parts)

    @property
    def is_stochastic(self) -> bool:  # type: ignore[override]
        """True when any wrapped operator is."""
        return any(part.is_stochastic for part in self._parts)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Every wrapped operator's :meth:`Operator.frozen` block."""
        with contextlib.ExitStack() as stack:
            for part in self._parts:
                stack.enter_context(part.frozen())
            yield

    @contextlib.contextmanager
    def deferred_checks(self) -> Iterator[None]:
        """Every wrapped operator's :meth:`Operator.deferred_checks` block."""
        with contextlib.ExitStack() as stack:
            for part in self._parts:
                stack.enter_context(part.deferred_checks())
            yield

    def flush_checks(self) -> None:
        """Every wrapped operator's :meth:`Operator.flush_checks`."""
        for part in self._parts:
            part.flush_checks()


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 (the current device) name the same place."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


class LambdaOperator(Operator):
    """An operator given by any function ``apply_fn(v) -> A v`` on flat vectors of length ``size``.

    ``apply_fn`` receives a (n,) tensor of ``dtype`` on ``device`` and must return one of the same
    shape. If ``apply_block_fn`` is given it is used for blocks, (n, b) -> (n, b).

    ``dtype=None`` (default) finds the dtype from one call of ``apply_fn`` on a zero vector: the
    floating dtype it returns for a vector of torch's default dtype (float32), or float64 when
    the function fails on float32 (e.g. ``lambda v: a64 @ v``). That call is not counted in
    ``num_products``; pass ``dtype`` to skip it.
    """

    def __init__(
        self,
        apply_fn: Callable[[Tensor], Tensor],
        size: int,
        dtype: Optional[torch.dtype] = None,
        device: Any = "cpu",
        apply_block_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if not callable(apply_fn):
            raise TypeError(f"apply_fn must be a callable v -> A v, got {type(apply_fn).__name__}.")
        if apply_block_fn is not None and not callable(apply_block_fn):
            raise TypeError(f"apply_block_fn must be a callable (n, b) -> (n, b), got {type(apply_block_fn).__name__}.")
        size = check_positive_int(size, "size")
        if dtype is None:
            dtype = _probe_dtype(apply_fn, size, torch.device(device))
        super().__init__(size, dtype, device)
        self.apply_fn = apply_fn
        self.apply_block_fn = apply_block_fn

    def _matvec(self, vec: Tensor) -> Tensor:
        return self._convert_output(self.apply_fn(vec), (self.size,), "apply_fn")

    def _matmat(self, mat: Tensor) -> Tensor:
        if self.apply_block_fn is None:
            return super()._matmat(mat)
        return self._convert_output(self.apply_block_fn(mat), tuple(mat.shape), "apply_block_fn")

    def _convert_output(self, out: Any, shape: tuple, fn_name: str) -> Tensor:
        if not isinstance(out, Tensor):
            out = torch.as_tensor(out)
        if tuple(out.shape) != shape:
            raise ValueError(f"LambdaOperator's {fn_name} returned shape {tuple(out.shape)}, expected {shape}.")
        return out.to(dtype=self.dtype, device=self.device)


def _probe_dtype(apply_fn: Callable[[Tensor], Any], size: int, device: torch.device) -> torch.dtype:
    """The dtype a LambdaOperator works in: what ``apply_fn`` returns for a zero vector of torch's
    default dtype, or for float64 where that call fails. The global random state is left as it was."""
    default = torch.get_default_dtype()
    candidates = [default] + [d for d in (torch.float64, torch.float32) if d != default]
    errors = []
    for dtype in candidates:
        try:
            with preserved_global_rng():
                out = apply_fn(torch.zeros(size, dtype=dtype, device=device))
        except Exception as exc:  # noqa: BLE001 - the function may only work in another dtype
            errors.append(f"{dtype}: {type(exc).__name__}: {exc}")
            continue
        if isinstance(out, Tensor) and out.dtype.is_floating_point:
            return out.dtype
        return dtype
    raise TypeError(
        f"LambdaOperator(dtype=None) calls apply_fn once on a zero vector of shape ({size},) on {device} to find "
        f"the dtype it works in, but every call failed ({'; '.join(errors)}). Pass dtype= (and device=) for "
        f"the vectors apply_fn takes, or fix apply_fn."
    )


class MatrixOperator(Operator):
    """A dense symmetric matrix as an operator. dtype and device are the matrix's own.

    Raises ValueError if the matrix is not square, not finite, or not symmetric (to a tolerance
    relative to its largest entry); pass ``check_symmetric=False`` to skip the symmetry check.
    """

    def __init__(self, matrix: Union[Tensor, np.ndarray], check_symmetric: bool = True) -> None:
        if isinstance(matrix, np.ndarray):
            matrix = torch.from_numpy(matrix)
        if not isinstance(matrix, Tensor):
            raise TypeError(f"MatrixOperator expects a torch.Tensor or numpy array, got {type(matrix).__name__}.")
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"MatrixOperator expects a square (n, n) matrix, got shape {tuple(matrix.shape)}.")
        if not matrix.dtype.is_floating_point:
            matrix = matrix.to(torch.get_default_dtype())
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError("MatrixOperator: the matrix contains NaN or Inf entries.")
        if check_symmetric:
            scale = float(matrix.abs().max()) if matrix.numel() else 0.0
            eps = torch.finfo(matrix.dtype).eps
            asym = float((matrix - matrix.T).abs().max()) if matrix.numel() else 0.0
            if asym > 100 * eps * max(scale, 1e-300) * max(1, matrix.shape[0]) ** 0.5:
                raise ValueError(
                    f"MatrixOperator expects a symmetric matrix, but max|A - A^T| = {asym:.3g} "
                    f"(max|A| = {scale:.3g}). Symmetrise it with (A + A.T) / 2 if that is what you mean."
                )
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, vec: Tensor) -> Tensor:
        return self.matrix @ vec

    def _matmat(self, mat: Tensor) -> Tensor:
        return self.matrix @ mat


def as_operator(obj: Any) -> Operator:
    """Return ``obj`` as an Operator: operators pass through, dense tensors/arrays become MatrixOperator.

    A bare callable has no size, so it must be wrapped: ``LambdaOperator(fn, n)``.
    """
    if isinstance(obj, Operator):
        return obj
    if isinstance(obj, (Tensor, np.ndarray)):
        return MatrixOperator(obj)
    if callable(obj):
        raise TypeError(
            "A function cannot be used as an operator directly because its size is unknown; "
            "wrap it as LambdaOperator(fn, n)."
        )
    raise TypeError(
        f"Expected an Operator (e.g. HVPOperator, LambdaOperator) or a dense symmetric matrix, "
        f"got {type(obj).__name__}."
    )
