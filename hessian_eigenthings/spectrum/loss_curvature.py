"""The curvature of a loss with respect to a model's outputs, one sample at a time.

For outputs ``z`` of shape (B, ...) seen as B rows of K = numel / B numbers, a loss that is a sum
or mean of per-sample terms has a block-diagonal Hessian ``d^2 L / dz^2``: one K x K block per
row. The backpropagated diagonals need, per micro-batch, that block's diagonal (HesScale), a
factor of it (the exact GGN diagonal) or a random vector whose outer product is it on average
(the Monte-Carlo GGN diagonal). Each is computed here:

* closed forms for ``nn.CrossEntropyLoss`` (``weight=None``, class-index targets, (B, C) logits):
  ``c_b (diag(p) - p p^T)`` with ``p = softmax(z_b)`` and ``c_b`` the row's share of the reduction
  (0 for an ignored target); and for ``nn.MSELoss``: ``2 / (B K) I`` ("mean") or ``2 I`` ("sum");
* any other loss by automatic differentiation: K Hessian-vector products through the loss alone
  (cheap: the model is not involved), with a check that the loss does not couple samples.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

# Loss Hessian blocks larger than this (B * K * K numbers) are refused with advice.
MAX_BLOCK_BYTES = 2**30


class LossCurvature:
    """Second derivatives of ``loss_fn(z)`` w.r.t. ``z``, block-diagonal over rows.

    Args:
        loss_fn: the micro-batch loss as a function of the outputs (B, ...), a scalar.
        outputs: the outputs z at which to differentiate (detached here).
    """

    def __init__(self, loss_fn: Callable[[Tensor], Tensor], outputs: Tensor) -> None:
        self.loss_fn = loss_fn
        self.z = outputs.detach()
        self.rows = self.z.shape[0]
        self.k = self.z[0].numel() if self.rows else 0

    # -- what subclasses may do in closed form ------------------------------------------------
    def diagonal(self) -> Tensor:
        """(B, ...) shaped like z: the diagonal of each row's block."""
        return self._autograd_blocks(diagonal_only=True).reshape(self.z.shape)

    def blocks(self) -> Tensor:
        """(B, K, K): each row's Hessian block."""
        return self._autograd_blocks(diagonal_only=False)

    def factor(self) -> tuple[Tensor, Tensor]:
        """(B, K, R) columns f and (B, R) signs s with ``block_b = sum_r s_br f_br f_br^T``."""
        values, vectors = self._eigen()
        return vectors * values.abs().sqrt().unsqueeze(1), torch.sign(values)

    def _eigen(self) -> tuple[Tensor, Tensor]:
        if not hasattr(self, "_eigenpairs"):
            self._eigenpairs = torch.linalg.eigh(_symmetrised(self.blocks()))
        return self._eigenpairs

    def sample(self, generator: torch.Generator) -> Tensor:
        """(B, ...) random r with ``E[r_b r_b^T] = block_b`` (the blocks must be positive semi-definite)."""
        values, vectors = self._eigen()
        scale = values.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
        if bool((values < -1e3 * torch.finfo(values.dtype).eps * scale).any()):
            raise ValueError(
                "ggn_mc: the loss is not convex in the model outputs (its Hessian w.r.t. them has negative "
                "eigenvalues), so the GGN is not positive semi-definite and has no Monte-Carlo factorisation. "
                "Use method='ggn_exact'."
            )
        noise = _normal(values.shape, generator, values)
        return (vectors @ (values.clamp_min(0).sqrt() * noise).unsqueeze(2)).reshape(self.z.shape)

    # -- the generic path ---------------------------------------------------------------------
    def _autograd_blocks(self, diagonal_only: bool) -> Tensor:
        """Each row's block (or only its diagonal, (B, K)) from K Hessian-vector products through the
        loss alone, and a check with one more that the loss couples no two rows."""
        b, k = self.rows, self.k
        dtype, device = self.z.dtype, self.z.device
        if not diagonal_only and b * k * k * self.z.element_size() > MAX_BLOCK_BYTES:
            raise ValueError(
                f"The loss Hessian w.r.t. the outputs has {b} blocks of {k} x {k}, more than "
                f"{MAX_BLOCK_BYTES // 2**20} MiB. Use nn.CrossEntropyLoss or nn.MSELoss (closed forms), or "
                f"smaller micro-batches (max_possible_gpu_samples)."
            )
        with torch.enable_grad():
            z = self.z.clone().requires_grad_(True)
            loss = self.loss_fn(z)
            (grad,) = torch.autograd.grad(loss, z, create_graph=True)
            flat_grad = grad.reshape(b, k)
            probe = _normal((b, k), torch.Generator(device="cpu").manual_seed(0), self.z)
            out = torch.zeros(b, k, dtype=dtype, device=device) if diagonal_only else \
                torch.zeros(b, k, k, dtype=dtype, device=device)
            assembled = torch.zeros(b, k, dtype=dtype, device=device)  # sum_j block[:, :, j] probe[:, j]
            if flat_grad.requires_grad:
                chunk = max(1, min(k, (2**26) // max(1, b * k)))
                for start in range(0, k, chunk):
                    stop = min(k, start + chunk)
                    units = torch.zeros(stop - start, b, k, dtype=dtype, device=device)
                    units[torch.arange(stop - start), :, torch.arange(start, stop)] = 1
                    columns = _batched_hvp(flat_grad, z, units)  # (c, B, K): column j of every block
                    for offset, j in enumerate(range(start, stop)):
                        column = columns[offset]
                        if diagonal_only:
                            out[:, j] = column[:, j]
                        else:
                            out[:, :, j] = column
                        assembled += column * probe[:, j : j + 1]
                (full,) = torch.autograd.grad(flat_grad, z, grad_outputs=probe, retain_graph=False)
                _check_rows_independent(full.reshape(b, k), assembled)
        return out


def _batched_hvp(flat_grad: Tensor, z: Tensor, units: Tensor) -> Tensor:
    """``d (flat_grad . u) / dz`` for each u in ``units`` (c, B, K), shape (c, B, K)."""
    try:
        (columns,) = torch.autograd.grad(flat_grad, z, grad_outputs=units, retain_graph=True, is_grads_batched=True)
        return columns.reshape(units.shape)
    except RuntimeError:  # a loss whose backward vmap cannot batch: one product per column
        return torch.stack([
            torch.autograd.grad(flat_grad, z, grad_outputs=u, retain_graph=True)[0].reshape(u.shape) for u in units
        ])


def _check_rows_independent(full: Tensor, assembled: Tensor) -> None:
    """Compare ``H v`` with the product of the row blocks: they differ when the loss couples samples."""
    scale = torch.linalg.vector_norm(full) + torch.linalg.vector_norm(assembled)
    eps = torch.finfo(full.dtype).eps
    if float(torch.linalg.vector_norm(full - assembled)) > 1e3 * eps * max(float(scale), 1e-300) + 1e-30:
        raise ValueError(
            "The loss couples different samples: its Hessian w.r.t. the model outputs is not block-diagonal "
            "over the rows (the first dimension) of the outputs. The backpropagated diagonals need a loss that "
            "is a sum or mean of per-sample terms; use method='exact' or 'hutchinson' for this loss."
        )


def _symmetrised(blocks: Tensor) -> Tensor:
    return (blocks + blocks.transpose(1, 2)) / 2


def _normal(shape: tuple, generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal numbers from a private CPU generator, moved to ``like``'s device and dtype."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


class CrossEntropyCurvature(LossCurvature):
    """``nn.CrossEntropyLoss`` on (B, C) logits with class-index targets and ``weight=None``:
    row b's block is ``c_b (diag(p_b) - p_b p_b^T)``, whatever the label smoothing."""

    def __init__(
        self, loss_fn: Callable[[Tensor], Tensor], outputs: Tensor, targets: Tensor, module: nn.CrossEntropyLoss
    ) -> None:
        super().__init__(loss_fn, outputs)
        valid = (targets != module.ignore_index).to(self.z.dtype)
        if module.reduction == "mean":
            valid = valid / valid.sum().clamp_min(1)
        self.scale = valid  # (B,)
        self.probs = torch.softmax(self.z, dim=1)

    def diagonal(self) -> Tensor:
        return self.scale[:, None] * (self.probs - self.probs**2)

    def blocks(self) -> Tensor:
        p = self.probs
        return self.scale[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])

    def factor(self) -> tuple[Tensor, Tensor]:
        # diag(p) - p p^T = (diag(sqrt p) - p sqrt(p)^T)(diag(sqrt p) - sqrt(p) p^T), as p sums to 1
        root = self.probs.sqrt()
        columns = torch.diag_embed(root) - self.probs[:, :, None] * root[:, None, :]
        columns = columns * self.scale.sqrt()[:, None, None]
        return columns, torch.ones(self.rows, self.k, dtype=self.z.dtype, device=self.z.device)

    def sample(self, generator: torch.Generator) -> Tensor:
        # a label drawn from the model's predictive distribution: E[(p - e_y)(p - e_y)^T] = diag(p) - p p^T
        # inverse transform: the first class whose cumulative probability exceeds a uniform number
        uniform = torch.rand(self.rows, 1, generator=generator, dtype=torch.float64).to(self.z.device, self.z.dtype)
        drawn = (self.probs.cumsum(dim=1) < uniform).sum(dim=1).clamp_max(self.k - 1)
        onehot = nn.functional.one_hot(drawn, self.k).to(self.z.dtype)
        return self.scale.sqrt()[:, None] * (self.probs - onehot)


class MSECurvature(LossCurvature):
    """``nn.MSELoss``: every block is ``c I`` with ``c = 2 / (B K)`` ("mean") or 2 ("sum")."""

    def __init__(self, loss_fn: Callable[[Tensor], Tensor], outputs: Tensor, module: nn.MSELoss) -> None:
        super().__init__(loss_fn, outputs)
        self.c = 2.0 / max(1, self.z.numel()) if module.reduction == "mean" else 2.0

    def diagonal(self) -> Tensor:
        return torch.full_like(self.z, self.c)

    def blocks(self) -> Tensor:
        eye = torch.eye(self.k, dtype=self.z.dtype, device=self.z.device)
        return self.c * eye.expand(self.rows, self.k, self.k).clone()

    def factor(self) -> tuple[Tensor, Tensor]:
        columns = self.blocks() / self.c * self.c**0.5
        return columns, torch.ones(self.rows, self.k, dtype=self.z.dtype, device=self.z.device)

    def sample(self, generator: torch.Generator) -> Tensor:
        # a target drawn from the Gaussian the squared error is the likelihood of
        return self.c**0.5 * _normal(tuple(self.z.shape), generator, self.z)


def loss_curvature(
    criterion: Callable, loss_fn: Callable[[Tensor], Tensor], outputs: Tensor, targets: object,
    closed_form: bool = True,
) -> LossCurvature:
    """The :class:`LossCurvature` of ``loss_fn`` (= ``criterion(., targets)``, possibly after parameter-
    free output layers) at ``outputs``: a closed form when ``criterion`` is applied directly
    (``closed_form``) and is one we know, else automatic differentiation."""
    module = known_loss_module(criterion)
    if closed_form and _plain_cross_entropy(module, outputs, targets):
        return CrossEntropyCurvature(loss_fn, outputs, targets, module)  # type: ignore[arg-type]
    if closed_form and type(module) is nn.MSELoss and isinstance(targets, Tensor) and targets.shape == outputs.shape:
        return MSECurvature(loss_fn, outputs, module)
    return LossCurvature(loss_fn, outputs)


def known_loss_module(criterion: Callable) -> Optional[nn.Module]:
    """The loss module ``criterion`` is, or stands for: ``F.cross_entropy`` and ``F.mse_loss`` called with
    their defaults are ``nn.CrossEntropyLoss()`` and ``nn.MSELoss()``."""
    if isinstance(criterion, nn.Module):
        return criterion
    if criterion is nn.functional.cross_entropy:
        return nn.CrossEntropyLoss()
    if criterion is nn.functional.mse_loss:
        return nn.MSELoss()
    return None


def _plain_cross_entropy(criterion: Optional[nn.Module], outputs: Tensor, targets: object) -> bool:
    return (
        type(criterion) is nn.CrossEntropyLoss and criterion.weight is None and outputs.dim() == 2
        and isinstance(targets, Tensor) and targets.dim() == 1 and not targets.dtype.is_floating_point
    )


def batch_reduction(criterion: Callable, outputs: Tensor, targets: object) -> Optional[str]:
    """Whether ``criterion`` averages ("mean") or sums ("sum") its per-sample terms; None when it
    cannot be told from this batch (a zero loss).

    A loss module says so in ``.reduction``. For a plain function, the loss of the batch is compared
    with the loss of the batch repeated twice: a mean is unchanged, a sum doubles. Anything else
    is refused, as the batches could not then be combined into the loss of the whole dataset.
    """
    declared = declared_reduction(criterion)
    if declared is not None:
        return declared
    with torch.no_grad():
        once = criterion(outputs, targets)
        twice = criterion(_repeated(outputs), _repeated(targets))
    if not isinstance(once, Tensor) or once.dim() != 0:
        raise ValueError("The loss must return a scalar tensor (the mean or the sum over the batch's samples).")
    once, twice = float(once), float(twice)
    tol = 1e-4 * abs(once) + 1e-30
    if once == 0 or not (abs(once) < float("inf")):
        return None
    if abs(twice - once) <= tol:
        return "mean"
    if abs(twice - 2 * once) <= 2 * tol:
        return "sum"
    raise ValueError(
        f"The loss is neither a mean nor a sum over samples: on this batch it is {once:.6g}, and on the batch "
        f"repeated twice {twice:.6g} (a mean would give the same, a sum twice as much). The backpropagated "
        f"diagonals combine batches as the operators do and need one of the two; use reduction='mean' or 'sum'."
    )


def declared_reduction(criterion: Callable) -> Optional[str]:
    """"mean" or "sum" when a loss module (or a known loss function) says so, else None."""
    module = known_loss_module(criterion)
    declared = getattr(module, "reduction", None)
    return declared if declared in ("mean", "sum") else None


def _repeated(obj: object) -> object:
    if isinstance(obj, Tensor):
        return torch.cat([obj, obj]) if obj.dim() > 0 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_repeated(item) for item in obj)
    if isinstance(obj, dict):
        return {key: _repeated(item) for key, item in obj.items()}
    return obj
