"""Symmetric diagonal preconditioning of any operator, and Adam's diagonal preconditioner.

For a symmetric ``A`` and a positive diagonal ``P = diag(p)``, the operator
``P^{-1/2} A P^{-1/2}`` is symmetric and has the same eigenvalues as ``P^{-1} A``: if
``P^{-1/2} A P^{-1/2} u = lambda u`` then ``P^{-1} A (P^{-1/2} u) = lambda (P^{-1/2} u)``. With
``A`` a loss Hessian and ``P`` the denominator of an adaptive optimizer, its top eigenvalue is the
"preconditioned sharpness" that governs the stability of that optimizer (Cohen et al., 2022,
"Adaptive gradient methods at the edge of stability").

Adam's update of a parameter with gradient moments ``m_t``, ``v_t`` after ``t`` steps is

    theta <- theta - lr * m_hat / (sqrt(v_hat) + eps),
    m_hat = m_t / (1 - beta1**t),   v_hat = v_t / (1 - beta2**t),

so its diagonal preconditioner is ``P = diag(sqrt(v_hat) + eps)``, with ``v_t`` the optimizer's
``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad=True``) and ``t`` its ``step``: exactly the
denominator torch's Adam and AdamW divide by. :func:`adam_preconditioner` reads it without changing
the optimizer.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .base import Operator, WrappingOperator, as_operator


class PreconditionedOperator(WrappingOperator):
    """``P^{-1/2} A P^{-1/2}`` for a symmetric operator ``A`` and a positive diagonal ``P = diag(p)``.

    Its eigenvalues are those of ``P^{-1} A``. An eigenvector ``u`` of this operator corresponds to
    the eigenvector ``P^{-1/2} u`` of ``P^{-1} A`` (see :meth:`to_original`).

    Args:
        operator: the symmetric operator ``A`` (any :class:`Operator`, or a dense symmetric matrix).
        diagonal: ``p``, shape (n,), every entry positive and finite; converted to the operator's
            dtype and device.

    Attributes:
        operator: the wrapped ``A``; its own ``num_products`` counts as well.
        inv_sqrt: ``p**-0.5``, shape (n,).
    """

    def __init__(self, operator: Union[Operator, Tensor, np.ndarray], diagonal: Union[Tensor, np.ndarray]) -> None:
        inner = as_operator(operator)
        super().__init__([inner], inner.size)
        self.operator = inner
        self.inv_sqrt = check_diagonal(diagonal, inner).rsqrt()

    def _matvec(self, vec: Tensor) -> Tensor:
        return self.inv_sqrt * self.operator.apply(self.inv_sqrt * vec)

    def _matmat(self, mat: Tensor) -> Tensor:
        scale = self.inv_sqrt.unsqueeze(1)
        return scale * self.operator.apply_block(scale * mat)

    def to_original(self, vectors: Union[Tensor, np.ndarray]) -> Tensor:
        """Map eigenvectors of this operator to unit eigenvectors of ``P^{-1} A``.

        Args:
            vectors: (n,) or (k, n) rows, e.g. a solver's ``eigenvectors``.

        Returns:
            A tensor of the same shape: ``P^{-1/2} u`` for each row ``u``, normalised to unit norm.
        """
        vecs = torch.as_tensor(vectors).to(device=self.device, dtype=self.dtype)
        if vecs.shape[-1] != self.size:
            raise ValueError(f"vectors must have shape (n,) or (k, n) with n={self.size}, got {tuple(vecs.shape)}.")
        mapped = vecs * self.inv_sqrt
        return mapped / torch.linalg.vector_norm(mapped, dim=-1, keepdim=True)

    def __repr__(self) -> str:
        return f"PreconditionedOperator({self.operator!r})"


def check_diagonal(diagonal: Any, operator: Operator) -> Tensor:
    """Validate a preconditioner diagonal for ``operator``: a positive finite (n,) tensor, returned in the
    operator's dtype and on its device."""
    if isinstance(diagonal, np.ndarray):
        diagonal = torch.from_numpy(diagonal)
    if not isinstance(diagonal, Tensor):
        raise TypeError(f"diagonal must be a torch.Tensor or numpy array of shape (n,), got {type(diagonal).__name__}.")
    if diagonal.shape != (operator.size,):
        raise ValueError(
            f"diagonal must have shape (n,) = ({operator.size},) like the operator, got {tuple(diagonal.shape)}."
        )
    diagonal = diagonal.detach().to(device=operator.device, dtype=operator.dtype)
    if not bool(torch.isfinite(diagonal).all()):
        raise ValueError("diagonal contains NaN or Inf entries; a preconditioner must be finite.")
    if not bool((diagonal > 0).all()):
        smallest = float(diagonal.min())
        raise ValueError(
            f"diagonal must be positive everywhere (smallest entry {smallest:.3g}); P^(-1/2) is undefined "
            f"otherwise. Adam's denominator sqrt(v_hat) + eps is positive whenever eps > 0."
        )
    return diagonal


def adam_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Optional[Iterable[Tensor]] = None,
    *,
    bias_correction1: bool = False,
) -> Tensor:
    """Adam's diagonal preconditioner ``sqrt(v_hat) + eps`` as one flat vector, read without changing it.

    For each parameter with Adam state (``step`` t, ``exp_avg_sq`` v, or ``max_exp_avg_sq`` when the
    group has ``amsgrad=True``) and its group's ``betas = (beta1, beta2)`` and ``eps``:

        p = sqrt(v / (1 - beta2**t)) + eps

    which is exactly the denominator of torch's Adam/AdamW update. With ``bias_correction1=True``
    the result is multiplied by ``1 - beta1**t``, folding Adam's first-moment bias correction into
    the preconditioner as Cohen et al. (2022) do (the update is then ``lr * m / P``); it tends to 1
    as t grows.

    Args:
        optimizer: a ``torch.optim.Adam`` or ``torch.optim.AdamW`` (or subclass) that has taken at
            least one step.
        params: the parameters, in the order of the flat vectors they are laid out in (e.g. an
            operator's chosen parameters); default: every parameter of the optimizer's groups, in
            group order.
        bias_correction1: also multiply by ``1 - beta1**t`` (see above).

    Returns:
        A (n,) tensor, n the total number of entries of ``params``, on the parameters' device, in
        their dtype.

    Raises:
        TypeError: not an Adam/AdamW optimizer.
        ValueError: a parameter is not in the optimizer, or has no state yet (no step taken).
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(
            f"adam_preconditioner reads torch.optim.Adam / AdamW state, got {type(optimizer).__name__}. For "
            f"another optimizer, build its diagonal yourself and use PreconditionedOperator(op, diagonal)."
        )
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
    pieces = []
    for index, param in enumerate(params):
        group = group_of.get(id(param))
        if group is None:
            raise ValueError(
                f"params: parameter #{index} (shape {tuple(param.shape)}) is not optimised by this optimizer; "
                f"pass the parameters the optimizer was built with."
            )
        state = optimizer.state.get(param, {})
        key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        if key not in state or "step" not in state:
            raise ValueError(
                f"The optimizer has no {key!r} state for parameter #{index} (shape {tuple(param.shape)}): Adam's "
                f"preconditioner exists only after its first optimizer.step()."
            )
        beta1, beta2 = (float(b) for b in group["betas"])
        eps = float(group["eps"])
        step = float(state["step"])
        with torch.no_grad():
            v_hat = state[key].detach().to(param.dtype) / (1.0 - beta2**step)
            diag = v_hat.sqrt() + eps
            if bias_correction1:
                diag = diag * (1.0 - beta1**step)
        pieces.append(diag.reshape(-1).to(param.device))
    if not pieces:
        raise ValueError("params is empty: there is no parameter to build a preconditioner for.")
    return torch.cat(pieces)

