"""Operators built from operators: linear combinations and shifts, deflation by a projector, and
principal submatrices. Every product stays on the operators' device and goes through
``apply_block``, so each solver and estimator accepts them like any other operator.

* ``a * op``, ``op * a``, ``op / a``, ``-op``, ``op + op2``, ``op - op2``, ``op + c``, ``c - op``:
  :class:`LinearCombination`, ``sum_k a_k A_k + c I`` (``op + c`` is the shift ``A + c I``).
* :func:`deflate` / :class:`ProjectedOperator`: ``P A P`` with ``P = I - V V^T``, which keeps the
  spectrum of ``A`` on the complement of ``range(V)`` and puts zeros on ``range(V)``.
* :func:`submatrix` / :class:`SubmatrixOperator`: ``A[idx][:, idx]`` by flat indices, or the block of
  some parameters of a model operator by their names.

Each passes :meth:`~Operator.frozen`, :meth:`~Operator.deferred_checks` and
:meth:`~Operator.flush_checks` through to the operators it wraps (so model operators keep their
graphs through it), and is stochastic when any part is.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..utils import logger
from .base import Operator, WrappingOperator, as_operator


def check_scalar(value: Any, what: str) -> float:
    """``value`` as a finite Python float (a real number, numpy scalar or 0-d tensor), or a TypeError /
    ValueError that says what is accepted."""
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise TypeError(
                f"{what} must be a number, got a tensor of shape {tuple(value.shape)}; for the product of the "
                f"operator with a vector or block use op @ v."
            )
        if value.is_complex():
            raise TypeError(f"{what} must be a real number, got a complex tensor.")
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value}.")
    return value


def check_compatible(first: Operator, other: Operator, action: str) -> None:
    """Refuse to combine operators of different size, dtype or device, saying how to match them."""
    if other.size != first.size:
        raise ValueError(
            f"Cannot {action} {type(first).__name__} of size {first.size} and {type(other).__name__} of size "
            f"{other.size}: both must act on vectors of the same length."
        )
    if other.dtype != first.dtype:
        raise TypeError(
            f"Cannot {action} operators of dtypes {first.dtype} and {other.dtype}; build both in the same dtype "
            f"(e.g. a MatrixOperator from matrix.to({first.dtype}), or the model in that dtype)."
        )
    if other.device != first.device:
        raise ValueError(
            f"Cannot {action} operators on {first.device} and {other.device}; build both on the same device."
        )


class LinearCombination(WrappingOperator):
    """``sum_k a_k A_k + c I`` for symmetric operators ``A_k`` of one size, dtype and device.

    Built by the arithmetic of operators (``2 * H``, ``H - G``, ``H - 0.5``, ``-H / 3``); a combination
    of combinations is flattened, and a repeated operator (the same object) is applied once.

    Args:
        terms: ``(a_k, A_k)`` pairs; the ``A_k`` are operators or dense symmetric matrices.
        shift: c, the multiple of the identity added.
    """

    def __init__(self, terms: Iterable[tuple[float, Any]], shift: float = 0.0) -> None:
        merged: list[list[Any]] = []
        total_shift = check_scalar(shift, "shift")
        for coefficient, operator in terms:
            coefficient = check_scalar(coefficient, "coefficient")
            operator = as_operator(operator)
            if isinstance(operator, LinearCombination):
                inner = [(coefficient * a, op) for a, op in operator.terms]
                total_shift += coefficient * operator.shift
            else:
                inner = [(coefficient, operator)]
            for a, op in inner:
                if merged:
                    check_compatible(merged[0][1], op, "combine")
                for entry in merged:
                    if entry[1] is op:
                        entry[0] += a
                        break
                else:
                    merged.append([a, op])
        if not merged:
            raise ValueError("LinearCombination needs at least one operator term.")
        self.terms: list[tuple[float, Operator]] = [(a, op) for a, op in merged]
        self.shift = total_shift
        super().__init__([op for _, op in self.terms], self.terms[0][1].size)

    def _matvec(self, vec: Tensor) -> Tensor:
        out = vec * self.shift if self.shift else None
        for a, op in self.terms:
            part = op.apply(vec) * a
            out = part if out is None else out.add_(part)
        return out

    def _matmat(self, mat: Tensor) -> Tensor:
        out = mat * self.shift if self.shift else None
        for a, op in self.terms:
            part = op.apply_block(mat) * a
            out = part if out is None else out.add_(part)
        return out

    def __repr__(self) -> str:
        text = ""
        for a, op in self.terms:
            sign = "-" if a < 0 else "+"
            magnitude = "" if abs(a) == 1 else f"{abs(a):g} * "
            text += f" {sign} {magnitude}{op!r}" if text else f"{'-' if a < 0 else ''}{magnitude}{op!r}"
        if self.shift:
            text += f" {'-' if self.shift < 0 else '+'} {abs(self.shift):g} I"
        return text


def scale(operator: Operator, factor: Any) -> LinearCombination:
    """``factor * A`` (what ``factor * op`` and ``op * factor`` build)."""
    return LinearCombination([(check_scalar(factor, "The factor of an operator"), operator)])


def divide(operator: Operator, divisor: Any) -> LinearCombination:
    """``A / divisor`` (what ``op / divisor`` builds)."""
    divisor = check_scalar(divisor, "The divisor of an operator")
    if divisor == 0:
        raise ZeroDivisionError("An operator cannot be divided by zero.")
    return LinearCombination([(1.0 / divisor, operator)])


def subtract_from(operator: Operator, other: Any) -> LinearCombination:
    """``other - A`` for a number ``other`` (``c I - A``); what ``c - op`` builds."""
    return LinearCombination([(-1.0, operator)], shift=check_scalar(other, "The number an operator is subtracted from"))


def add(operator: Operator, other: Any, sign: float = 1.0) -> LinearCombination:
    """``A + sign * other`` for an operator ``other`` (same size, dtype, device) or a number (a shift
    ``A + sign * c I``); what ``op + x`` and ``op - x`` build."""
    if isinstance(other, Operator):
        check_compatible(operator, other, "add")
        return LinearCombination([(1.0, operator), (sign, other)])
    if isinstance(other, (Tensor, np.ndarray)) and getattr(other, "ndim", 0) > 0:
        raise TypeError(
            "An operator can be added to another operator or to a number (a multiple of the identity); for a "
            "dense matrix M, add MatrixOperator(M)."
        )
    return LinearCombination([(1.0, operator)], shift=sign * check_scalar(other, "The shift added to an operator"))


def orthonormal_columns(vectors: Union[Tensor, np.ndarray], operator: Operator) -> Tensor:
    """An orthonormal basis (n, r) of the span of ``vectors`` ((n,) or (n, m)), in the operator's dtype and
    on its device. Columns that are already orthonormal (to ``sqrt(m) * 100 * eps``) are kept as given;
    otherwise the basis comes from an SVD, without directions of zero (relative) length."""
    if isinstance(vectors, np.ndarray):
        vectors = torch.from_numpy(vectors)
    if not isinstance(vectors, Tensor):
        raise TypeError(f"vectors must be a torch.Tensor or numpy array of shape (n, m), got {type(vectors).__name__}.")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(1)
    n = operator.size
    if vectors.dim() != 2 or vectors.shape[0] != n:
        hint = (
            " Eigenvectors from a solver come as rows (k, n): pass them transposed, eigenvecs.T."
            if vectors.dim() == 2 and vectors.shape[1] == n else ""
        )
        raise ValueError(f"vectors must have shape (n, m) with n={n} (one vector per column), got "
                         f"{tuple(vectors.shape)}.{hint}")
    if vectors.shape[1] == 0:
        raise ValueError("vectors is empty (m = 0): give at least one vector to project out.")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError("vectors contains NaN or Inf entries.")
    v = vectors.detach().to(device=operator.device, dtype=operator.dtype)
    m = v.shape[1]
    eps = torch.finfo(operator.dtype).eps
    gram = v.T @ v
    if float((gram - torch.eye(m, dtype=v.dtype, device=v.device)).abs().max()) <= 100 * eps * math.sqrt(m):
        return v
    u, sigma, _ = torch.linalg.svd(v, full_matrices=False)
    keep = sigma > sigma.max() * max(n, m) * eps
    if not bool(keep.any()):
        raise ValueError("vectors are all zero: there is nothing to project out.")
    if int(keep.sum()) < m:
        logger.info("deflate: the %d vectors span only %d dimensions; projecting those out.", m, int(keep.sum()))
    return u[:, keep]


class ProjectedOperator(WrappingOperator):
    """``P A P`` with ``P = I - V V^T``: the operator ``A`` deflated by the orthonormal columns of ``V``.

    On the complement of ``range(V)`` it acts like ``P A P``; every vector of ``range(V)`` is mapped to
    zero. When ``V`` holds eigenvectors of ``A``, the spectrum is that of ``A`` with their eigenvalues
    replaced by zeros, so a solver then finds the next eigenpairs.

    Args:
        operator: the symmetric operator ``A`` (an :class:`Operator` or a dense symmetric matrix).
        vectors: ``V``, (n, m) columns or one (n,) vector; orthonormalised if they are not
            orthonormal already (see :func:`orthonormal_columns`).
    """

    def __init__(self, operator: Any, vectors: Union[Tensor, np.ndarray]) -> None:
        inner = as_operator(operator)
        super().__init__([inner], inner.size)
        self.operator = inner
        self.basis = orthonormal_columns(vectors, inner)

    def _project(self, x: Tensor) -> Tensor:
        """``P x`` for a (n,) vector or (n, b) block."""
        return x - self.basis @ (self.basis.T @ x)

    def _matvec(self, vec: Tensor) -> Tensor:
        return self._project(self.operator.apply(self._project(vec)))

    def _matmat(self, mat: Tensor) -> Tensor:
        return self._project(self.operator.apply_block(self._project(mat)))

    def __repr__(self) -> str:
        return f"ProjectedOperator({self.operator!r}, projecting out {self.basis.shape[1]} vectors)"


def deflate(operator: Any, vectors: Union[Tensor, np.ndarray]) -> ProjectedOperator:
    """``P A P`` with ``P = I - V V^T`` (see :class:`ProjectedOperator`); ``vectors`` is ``V``, (n, m)."""
    return ProjectedOperator(operator, vectors)


def parameter_indices(operator: Operator, names: Union[str, Sequence[str]]) -> tuple[Tensor, list[str], list[int]]:
    """Flat indices of the chosen parameters of a model operator (one with ``param_names`` and
    ``unflatten``), in the operator's order; a name may also be a module prefix ("fc2" selects "fc2.weight"
    and "fc2.bias"). Returns (indices, chosen names, their sizes)."""
    all_names = getattr(operator, "param_names", None)
    if all_names is None or not callable(getattr(operator, "unflatten", None)):
        raise TypeError(
            f"Selecting by parameter name needs a model operator (with param_names and unflatten, such as "
            f"HVPOperator or GGNOperator); {type(operator).__name__} has none. Pass flat indices instead."
        )
    if isinstance(names, str):
        names = [names]
    pieces = operator.unflatten(torch.zeros(operator.size, dtype=operator.dtype, device=operator.device))
    sizes = {name: piece.numel() for name, piece in pieces.items()}
    wanted: set[str] = set()
    for item in names:
        if not isinstance(item, str):
            raise TypeError(f"params must be parameter names (strings), got {type(item).__name__}.")
        hits = [name for name in all_names if name == item or name.startswith(item + ".")]
        if not hits:
            raise ValueError(
                f"params: the operator has no parameter named {item!r} (nor any below it). Its parameters are: "
                f"{', '.join(all_names)}."
            )
        wanted.update(hits)
    chosen, chosen_sizes, ranges, start = [], [], [], 0
    for name in all_names:
        if name in wanted:
            chosen.append(name)
            chosen_sizes.append(sizes[name])
            ranges.append(torch.arange(start, start + sizes[name]))
        start += sizes[name]
    return torch.cat(ranges), chosen, chosen_sizes


class SubmatrixOperator(WrappingOperator):
    """The principal submatrix ``A[idx][:, idx] = E^T A E`` of a symmetric operator, of size ``len(idx)``:
    ``v -> (A E v)[idx]`` with ``E`` the embedding that puts ``v`` at the rows ``idx`` (zeros elsewhere).

    Args:
        operator: the symmetric operator ``A`` (an :class:`Operator` or a dense symmetric matrix).
        indices: distinct flat indices (a sequence, int tensor or array), or a boolean mask of length n.
        params: instead of ``indices``, parameter names (or module prefixes) of a model operator: the
            block of those parameters, in the operator's order. Such a submatrix has its own
            ``param_names`` and ``unflatten``.
    """

    def __init__(self, operator: Any, indices: Any = None, *, params: Union[str, Sequence[str], None] = None) -> None:
        inner = as_operator(operator)
        if (indices is None) == (params is None):
            raise TypeError("SubmatrixOperator takes either indices or params (parameter names), exactly one of them.")
        self._sizes: Optional[list[int]] = None
        if params is not None:
            index, names, sizes = parameter_indices(inner, params)
            self.param_names: list[str] = names
            self._sizes = sizes
        else:
            index = check_indices(indices, inner.size)
        super().__init__([inner], int(index.numel()))
        self.operator = inner
        self.indices = index.to(inner.device)

    def _embed(self, mat: Tensor) -> Tensor:
        full = mat.new_zeros((self.operator.size,) + tuple(mat.shape[1:]))
        full[self.indices] = mat
        return full

    def _matvec(self, vec: Tensor) -> Tensor:
        return self.operator.apply(self._embed(vec))[self.indices]

    def _matmat(self, mat: Tensor) -> Tensor:
        return self.operator.apply_block(self._embed(mat))[self.indices]

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a (len(idx),) vector by parameter (only for a submatrix chosen by ``params``)."""
        if self._sizes is None:
            raise TypeError("unflatten needs a SubmatrixOperator chosen by params (parameter names).")
        pieces = self.operator.unflatten(self._embed(vec))
        return {name: pieces[name] for name in self.param_names}

    def __repr__(self) -> str:
        chosen = f"params {self.param_names}" if self._sizes is not None else "indices"
        return f"SubmatrixOperator({self.operator!r}, {self.size} of {self.operator.size} entries by {chosen})"


def check_indices(indices: Any, n: int) -> Tensor:
    """Distinct flat indices in ``[0, n)`` (or a boolean mask of length n) as a 1-d int64 CPU tensor."""
    if isinstance(indices, slice):
        index = torch.arange(n)[indices]
    else:
        index = torch.as_tensor(np.asarray(indices) if not isinstance(indices, Tensor) else indices).reshape(-1)
    if index.numel() == 0:
        raise ValueError("indices selects no entry; choose at least one.")
    if index.dtype == torch.bool:
        if index.numel() != n:
            raise ValueError(f"A boolean mask of indices must have length n={n}, got {index.numel()}.")
        index = index.nonzero().squeeze(1)
    elif index.dtype.is_floating_point or index.dtype.is_complex:
        raise TypeError(f"indices must be integers (or a boolean mask), got dtype {index.dtype}.")
    index = index.to(device="cpu", dtype=torch.int64)
    if index.numel() == 0:
        raise ValueError("indices selects no entry (the mask is all False); choose at least one.")
    if int(index.min()) < -n or int(index.max()) >= n:
        raise ValueError(f"indices must lie in [0, {n}) (the operator's size), got values from "
                         f"{int(index.min())} to {int(index.max())}.")
    index = torch.where(index < 0, index + n, index)
    if torch.unique(index).numel() != index.numel():
        raise ValueError("indices must be distinct: a principal submatrix takes each row and column once.")
    return index


def submatrix(
    operator: Any, indices: Any = None, *, params: Union[str, Sequence[str], None] = None
) -> SubmatrixOperator:
    """The principal submatrix of ``operator`` by flat ``indices`` or by parameter names ``params`` (see
    :class:`SubmatrixOperator`)."""
    return SubmatrixOperator(operator, indices, params=params)
