"""The solver's side of an operator: every product a solver makes goes through one :class:`ProductView`.

The view does three things to each product, so that no solver has to:

* counts it and moves the solve's progress bar (by operator products, a block of b counting b);
* checks it for NaN/Inf and raises :class:`~hessian_eigenthings.operators.NonFiniteError` naming the
  solver and the product number. Solvers that keep their vectors on a GPU read nothing on the host
  per product: inside :meth:`deferred_checks` the checks are kept on the device and run at the
  solver's checkpoints (:meth:`flush_checks`);
* scales it by a power of two, fixed at the first nonzero product: 1 when that product's largest
  entry is of ordinary size (within 2**+-(E / 4) for a dtype whose largest number is 2**E: 2**+-32 in
  float32), else the power of two that brings the entry into [0.5, 1). Scaling by a power of two is
  exact, so the solver's arithmetic is the same as without it, but squared norms of operators with
  entries around 1e20 (or 1e-20) in float32 no longer overflow (underflow). Solvers work in the
  scaled units; :attr:`scale` turns their eigenvalues and residuals back.

A product the view returns may be the operator's own tensor (it is not copied when the scale is 1):
solvers treat products as read-only. Everything else (size, dtype, device, ``is_stochastic``,
``frozen()``) is the operator's own.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..operators.base import Operator
from ..operators.model_operator import NonFiniteError
from ..utils import progress


class ProductView(Operator):
    """Counts, checks and scales the products of ``operator`` for the solver named ``solver``.

    Args:
        operator: the user's operator.
        solver: the public name of the solver, for messages and the progress bar.
        verbose: show a progress bar of products.
        total: the progress bar's expected total (None when unknown); :meth:`close` sets it to the
            true count.

    Attributes:
        num_products: products made through this view (a block of b counts b).
        nonzero_seen: whether a nonzero product has been seen (up to date outside deferred checks,
            and after every :meth:`flush_checks`).
    """

    def __init__(self, operator: Operator, solver: str, verbose: bool = True, total: Optional[int] = None) -> None:
        super().__init__(operator.size, operator.dtype, operator.device)
        self.base = operator
        self.is_stochastic = operator.is_stochastic
        self.solver = solver
        self.bar = progress(total=total, desc=solver, verbose=verbose)
        self.nonzero_seen = False
        self._host_scale: Optional[float] = None  # fixed scale, once known on the host
        self._deferring = False
        self._pending: list[tuple[int, int, Tensor]] = []  # (first product number, count, all finite)
        # While the scale is not known on the host: the scale and whether it is fixed, on the device.
        self._device_scale: Optional[Tensor] = None
        self._device_fixed: Optional[Tensor] = None

    # -- products ------------------------------------------------------------------------------
    def apply(self, vec: Tensor) -> Tensor:
        """``A vec`` of the underlying operator, counted, checked and scaled; (n,) -> (n,)."""
        return self._after(self.base.apply(vec), 1)

    def apply_block(self, mat: Tensor) -> Tensor:
        """``A mat`` of the underlying operator, counted, checked and scaled; (n, b) -> (n, b)."""
        if mat.dim() == 2 and mat.shape[1] == 0:
            return self.base.apply_block(mat)
        return self._after(self.base.apply_block(mat), mat.shape[1])

    def _after(self, out: Tensor, count: int) -> Tensor:
        first = self.num_products + 1
        self.num_products += count
        self.bar.update(count)
        if self._deferring:
            self._pending.append((first, count, torch.isfinite(out).all()))
            return self._scale_on_device(out)
        largest = float(out.abs().max()) if out.numel() else 0.0  # one host read, as these solvers read anyway
        if not math.isfinite(largest):
            raise self._error(first, count)
        if largest > 0:
            self.nonzero_seen = True
            if self._host_scale is None:
                exponent = math.frexp(largest)[1]
                self._host_scale = 1.0 if abs(exponent) <= self._safe_exponent else math.ldexp(1.0, -exponent)
        return self._scaled(out)

    @property
    def _safe_exponent(self) -> int:
        """Products whose largest entry is within 2**+-this need no scaling: their squared norms stay
        far inside the dtype's range for any n below 2**(E / 2)."""
        return int(math.log2(torch.finfo(self.dtype).max)) // 4

    def _scaled(self, out: Tensor) -> Tensor:
        if self._host_scale is None or self._host_scale == 1.0:
            return out
        return out * self._host_scale  # never in place: the operator may return a tensor it keeps

    def _scale_on_device(self, out: Tensor) -> Tensor:
        if self._host_scale is not None:
            return self._scaled(out)
        # float32 holds every power of two a float32 product needs; wider dtypes hold their own
        dtype = out.dtype if torch.finfo(out.dtype).bits >= 32 else torch.float32
        largest = out.abs().amax().to(dtype) if out.numel() else torch.zeros((), dtype=dtype, device=out.device)
        if self._device_scale is None:
            self._device_scale = torch.ones((), dtype=dtype, device=out.device)
            self._device_fixed = torch.zeros((), dtype=torch.bool, device=out.device)
        exponent = torch.frexp(largest).exponent
        candidate = torch.where(exponent.abs() <= self._safe_exponent, torch.ones_like(largest),
                                torch.ldexp(torch.ones_like(largest), -exponent))
        hit = (largest > 0) & torch.isfinite(largest) & ~self._device_fixed
        self._device_scale = torch.where(hit, candidate, self._device_scale)
        self._device_fixed = self._device_fixed | hit
        return out * self._device_scale

    # -- checks --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def deferred_checks(self) -> Iterator[None]:
        """Keep the NaN/Inf checks (this view's and the operator's) and the choice of the scale on the
        device until :meth:`flush_checks` or the end of the block: no host read per product."""
        if self._deferring:
            yield
            return
        self._deferring = True
        try:
            with self.base.deferred_checks():
                yield
                self.flush_checks()
        finally:
            self._deferring = False
            self._pending = []

    def flush_checks(self) -> None:
        """Run the postponed checks now (one host read for all of them), raising on the first
        non-finite product, and fix the scale on the host once a nonzero product was seen."""
        self.base.flush_checks()
        if self._pending:
            pending, self._pending = self._pending, []
            flags = torch.stack([ok for _, _, ok in pending]).cpu()
            if not bool(flags.all()):
                first, count, _ = pending[int((~flags).nonzero()[0])]
                raise self._error(first, count)
        if self._host_scale is None and self._device_fixed is not None:
            fixed, scale = torch.stack([self._device_fixed.to(self._device_scale.dtype), self._device_scale]).tolist()
            if fixed:
                self._host_scale = scale
                self.nonzero_seen = True

    def _error(self, first: int, count: int) -> NonFiniteError:
        which = f"product {first}" if count == 1 else f"products {first}-{first + count - 1} (one block)"
        return NonFiniteError(
            f"{self.solver}: operator {which} of this solve returned NaN or Inf. The operator "
            f"({type(getattr(self.base, 'shown_operator', self.base)).__name__}) must return finite values for finite input vectors; check its "
            f"product function (or the model, loss and data of a model operator)."
        )

    # -- what the solver needs to know ---------------------------------------------------------
    @property
    def scale(self) -> float:
        """The factor the products were multiplied by (1.0 until a nonzero product was seen).
        Only call it outside :meth:`deferred_checks` or after :meth:`flush_checks`."""
        return 1.0 if self._host_scale is None else self._host_scale

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The operator's own :meth:`Operator.frozen` block."""
        with self.base.frozen():
            yield

    def close(self) -> None:
        """End the progress bar at the true number of products."""
        if not self.bar.disable:
            self.bar.total = self.bar.n
            self.bar.refresh()
        self.bar.close()

    def __repr__(self) -> str:
        return f"ProductView({self.base!r}, solver={self.solver!r})"
