"""What every eigensolver returns, and the checks and orderings they share."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..utils import private_generator, user_stacklevel
from ..operators.base import Operator


class ConvergenceWarning(UserWarning):
    """A solver ran out of steps before every eigenpair met its residual tolerance."""


@dataclass
class EigenResult:
    """Eigenpairs and how they were found. Unpacks like the classic tuple: ``vals, vecs = result``.

    The types are the same from every solver (``power_iteration`` gives one pair: a float and a
    (n,) vector):

    Attributes:
        eigenvalues: (k,) float64, ordered as ``which`` says: a numpy array (``to_numpy=True``) or a
            tensor on the operator's device.
        eigenvectors: (k, n), row i unit-norm and paired with eigenvalue i, in the operator's dtype:
            a numpy array (``to_numpy=True``) or a tensor on the operator's device.
        residuals: (k,) float64 array of ``||A v_i - lambda_i v_i||``.
        converged: (k,) bool array, True where the residual met the solver's tolerance.
        num_products: operator-vector products the solve used (a block of b counts b).
        which: the selector used ("LM", "LA" or "SA").
        tol: the relative residual tolerance that was asked for.
    """

    eigenvalues: Any
    eigenvectors: Any
    residuals: np.ndarray
    converged: np.ndarray
    num_products: int
    which: str = "LM"
    tol: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def relative_residuals(self) -> np.ndarray:
        """``||A v - lambda v|| / |lambda|`` for each pair (inf where lambda is 0)."""
        vals = np.abs(np.atleast_1d(np.asarray(_to_numpy(self.eigenvalues), dtype=np.float64)))
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(vals > 0, self.residuals / np.where(vals > 0, vals, 1.0), np.inf)

    def __iter__(self) -> Iterator[Any]:
        yield self.eigenvalues
        yield self.eigenvectors

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Any:
        return (self.eigenvalues, self.eigenvectors)[index]


def _to_numpy(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return x


def order_by_which(values: Tensor, which: str) -> Tensor:
    """Indices that sort ``values`` most extreme first: |.| descending (LM), descending (LA), ascending (SA)."""
    if which == "LM":
        return torch.argsort(values.abs(), descending=True, stable=True)
    if which == "LA":
        return torch.argsort(values, descending=True, stable=True)
    return torch.argsort(values, descending=False, stable=True)


def converged_mask(residuals: Tensor, values: Tensor, tol: float, dtype: torch.dtype) -> Tensor:
    """True where ``residual <= tol * |lambda|``, with a floor at the operator's rounding level.

    Products in a dtype with unit roundoff ``eps`` are only accurate to about ``eps * ||A||``, so a
    residual below ``10 * eps * max|lambda|`` counts as converged even for eigenvalues near zero.
    """
    scale = values.abs().max() if values.numel() else torch.zeros((), dtype=values.dtype)
    floor = 10 * torch.finfo(dtype).eps * scale
    return residuals <= torch.maximum(tol * values.abs(), floor.to(values.dtype))


def residual_norms(operator: Operator, values: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """``||A v_i - lambda_i v_i||`` for columns v_i of ``vectors`` (n, k); also returns ``A V``."""
    av = operator.apply_block(vectors)
    return torch.linalg.vector_norm(av - vectors * values.unsqueeze(0), dim=0), av


def warn_unconverged(
    solver: str, values: Sequence[float], residuals: Sequence[float], converged: Sequence[bool],
    tol: float, advice: str,
) -> None:
    """Emit a ConvergenceWarning naming the unconverged pairs, their residuals and what to raise."""
    bad = [i for i, ok in enumerate(converged) if not ok]
    if not bad:
        return
    details = ", ".join(
        f"#{i}: lambda={values[i]:.6g}, ||Av-lambda v||/|lambda|={residuals[i] / abs(values[i]) if values[i] else float('inf'):.2e}"
        for i in bad[:6]
    )
    more = f" and {len(bad) - 6} more" if len(bad) > 6 else ""
    warnings.warn(
        f"{solver} did not converge for {len(bad)} of {len(converged)} eigenpairs to relative residual "
        f"{tol:g}: {details}{more}. {advice}",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


def check_init_vectors(init: Any, operator: Operator, count: int, name: str) -> Optional[Tensor]:
    """Validate warm-start vectors and return them as an (n, count') tensor on the operator's device.

    Accepts a (n,) vector or a (m, n) array of row vectors; ``count'`` = min(m, count). Zero or
    non-finite vectors are rejected.
    """
    if init is None:
        return None
    if isinstance(init, np.ndarray):
        init = torch.from_numpy(init)
    if not isinstance(init, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(init).__name__}.")
    rows = init.reshape(1, -1) if init.dim() == 1 else init
    if rows.dim() != 2 or rows.shape[1] != operator.size:
        raise ValueError(
            f"{name} must have shape (n,) or (m, n) with n={operator.size} (the operator size), "
            f"got {tuple(init.shape)}."
        )
    rows = rows[:count].to(device=operator.device, dtype=operator.dtype)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError(f"{name} contains NaN or Inf entries.")
    if bool((torch.linalg.vector_norm(rows, dim=1) == 0).any()):
        raise ValueError(f"{name} contains a zero vector; a start vector must be nonzero.")
    return rows.T.contiguous()


def random_vectors(operator: Operator, count: int, seed: Optional[int]) -> Tensor:
    """(n, count) standard normal vectors from a private generator (the global RNG is not touched).

    The same on every rank under torch.distributed (see :func:`~hessian_eigenthings.utils.private_generator`).
    """
    gen = private_generator(seed)
    vectors = torch.randn(operator.size, count, generator=gen, dtype=operator.dtype)
    return vectors.to(operator.device)


def compat_flags(solver: str, fp16: bool) -> None:
    """The old ``fp16`` solver flag: precision now belongs to the operator."""
    if fp16:
        warnings.warn(
            f"{solver}(fp16=True) no longer lowers the solver's precision (half-precision vectors ruin "
            f"orthogonality); set fp16=True on the operator, e.g. HVPOperator(..., fp16=True), instead.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
