"""NaN/Inf checks of a model operator's products, immediate or postponed to save host syncs."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

# One micro-batch's check: (its label, its loss, whether its product is finite), all on the device.
Check = tuple[str, Tensor, Tensor]


class NonFiniteError(ValueError):
    """A loss or a Hessian-vector product came out NaN or Inf."""


class FiniteChecks:
    """The checks of a model operator's products: each product's are read on the host at its end
    (one sync), or, inside :meth:`deferring`, gathered and read at :meth:`flush` or the block's end."""

    def __init__(self) -> None:
        self.pending: Optional[list[Check]] = None  # gathered inside deferring(); None outside it

    def submit(self, checks: list[Check], may_defer: bool) -> None:
        """Check a product's micro-batches now, or later inside :meth:`deferring` where ``may_defer``."""
        if not checks:
            return
        if may_defer and self.pending is not None:
            self.pending.extend(checks)
        else:
            raise_if_not_finite(checks)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Postpone the checks submitted in this block to :meth:`flush` or its end (nested: the outer one)."""
        if self.pending is not None:
            yield
            return
        self.pending = []
        try:
            yield
        except BaseException:
            self.pending = None
            raise
        pending, self.pending = self.pending, None
        if pending:
            raise_if_not_finite(pending)

    def flush(self) -> None:
        """Run the postponed checks now: one host sync for all of them."""
        if self.pending:
            pending, self.pending = self.pending, []
            raise_if_not_finite(pending)


def raise_if_not_finite(checks: list[Check]) -> None:
    """Raise :class:`NonFiniteError`, naming the first micro-batch whose loss or product is NaN/Inf."""
    losses = torch.stack([loss.float() for _, loss, _ in checks])
    product_ok = torch.stack([ok for _, _, ok in checks])
    flags = torch.isfinite(losses) & product_ok
    if bool(flags.all()):  # the one sync
        return
    bad = int((~flags).nonzero()[0, 0])
    label, loss, _ = checks[bad]
    if not bool(torch.isfinite(loss)):
        raise NonFiniteError(
            f"The loss of {label} is {loss.item()}. Check the inputs and targets of that batch for "
            f"NaN/Inf and the model for overflow (try float64, or fp16=False)."
        )
    raise NonFiniteError(
        f"The Hessian-vector product of {label} has NaN/Inf entries although its loss is finite "
        f"({loss.item():.6g}). The vector or that batch's inputs may contain NaN/Inf (an Inf input can "
        f"leave the loss finite through a saturating activation), or the second derivatives overflow: "
        f"try float64 (model.double()) or fp16=False."
    )
