"""Probe vectors: random ones for the stochastic estimators, from a private generator, and blocks of
unit vectors for the exact ones (dense matrices, exact diagonals).

The global random state is never touched. Probes are drawn as rows of a (b, n) block and
returned transposed, so a stream of probes does not depend on how it is split into blocks: the
same seed gives the same probes whether they are drawn one at a time or sixteen at a time.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from ..operators.base import Operator
from ..utils import check_positive_int, private_generator

DISTRIBUTIONS = ("rademacher", "gaussian", "sphere")


def check_distribution(distribution: str) -> str:
    """Validate a probe distribution name: "rademacher" (entries +-1), "gaussian" (standard normal) or
    "sphere" (uniform on the sphere of radius sqrt(n)). Each has ``E[z z^T] = I``."""
    if not isinstance(distribution, str) or distribution.lower() not in DISTRIBUTIONS:
        raise ValueError(
            f"distribution={distribution!r} is not supported; use 'rademacher' (entries +-1, the lower "
            f"variance for trace and diagonal), 'gaussian' (standard normal entries) or 'sphere' (uniform "
            f"on the sphere of radius sqrt(n), XTrace's choice)."
        )
    return distribution.lower()


def probe_generator(seed: Optional[int]) -> torch.Generator:
    """A private CPU generator; ``seed=None`` seeds it from fresh OS entropy (the same on every rank
    under torch.distributed)."""
    return private_generator(seed)


class ProbeSettings(NamedTuple):
    """The checked arguments of a stochastic estimator (see :func:`check_probe_arguments`)."""

    max_products: int
    tol: Optional[float]
    rtol: Optional[float]
    min_probes: int
    block_size: int
    distribution: str
    generator: torch.Generator

    @property
    def adaptive(self) -> bool:
        """Whether a tolerance was asked for, so that the estimator may stop before the budget."""
        return self.tol is not None or self.rtol is not None

    def draw(self, operator: Operator, count: int) -> Tensor:
        """The next (n, count) probes of this estimator's stream (see :func:`draw_probes`)."""
        return draw_probes(operator, count, self.distribution, self.generator)


def check_probe_arguments(
    max_products: Any,
    tol: Any,
    rtol: Any,
    min_probes: Any,
    block_size: Any,
    distribution: Any,
    seed: Optional[int],
) -> ProbeSettings:
    """Check the arguments that every stochastic estimator (Hutchinson, Hutch++ and XTrace for the
    trace and the squared Frobenius norm, Hutchinson and XDiag for the diagonal) shares, and make its
    private probe generator from ``seed``.

    Raises a TypeError/ValueError that names the public argument and says what it accepts, before
    any product is spent. ``tol`` and ``rtol`` are returned as given (None or a positive number).
    Under torch.distributed with ``seed=None`` every rank must call this (see :func:`probe_generator`).
    """
    max_products = check_positive_int(max_products, "max_products")
    min_probes = check_positive_int(min_probes, "min_probes")
    block_size = check_positive_int(block_size, "block_size")
    for name, value in (("tol", tol), ("rtol", rtol)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number or None, got {value!r}.")
    distribution = check_distribution(distribution)
    return ProbeSettings(max_products, tol, rtol, min_probes, block_size, distribution, probe_generator(seed))


def draw_probes(operator: Operator, count: int, distribution: str, gen: torch.Generator) -> Tensor:
    """(n, count) probe vectors with E[z z^T] = I, on the operator's device and dtype.

    Drawn on the host in float64 and then converted, so the stream is the same for every device
    and dtype of the operator. "sphere" probes are the "gaussian" ones scaled to norm sqrt(n).
    """
    n = operator.size
    if distribution == "rademacher":
        rows = torch.randint(0, 2, (count, n), generator=gen, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    else:
        # One draw per row: torch's normal sampler fills a block in a size-dependent order.
        rows = torch.stack([torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(count)])
        if distribution == "sphere":
            rows *= (n**0.5) / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    return rows.T.to(device=operator.device, dtype=operator.dtype).contiguous()


def check_deterministic(operator: Operator, caller: str) -> None:
    """Refuse a stochastic operator (a new mini-batch per product) where every product must be of the
    same matrix, e.g. when its columns or diagonal are read off one block at a time."""
    if operator.is_stochastic:
        raise ValueError(
            f"{caller} needs a deterministic operator, but this one uses a different mini-batch for every "
            f"product; build it with full_dataset=True."
        )


def check_deflatable(operator: Operator, caller: str, alternative: str) -> None:
    """Refuse a stochastic operator for an estimator with an exact low-rank part (Hutch++, XTrace):
    that part comes from one product, whose mini-batch noise no standard error of the probes sees."""
    if operator.is_stochastic:
        raise ValueError(
            f"{caller} needs a deterministic operator: its exact part comes from one product, whose mini-batch "
            f"noise its standard error cannot see. Build the operator with full_dataset=True, or use "
            f"{alternative}, whose standard error includes the mini-batch noise."
        )


def unit_blocks(operator: Operator, block_size: int) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, E)`` for consecutive column ranges of the identity: E is (n, stop - start) with
    the unit vectors ``e_start .. e_{stop-1}``, on the operator's device and dtype; memory ``n * block_size``."""
    n = operator.size
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        units = torch.zeros(n, stop - start, dtype=operator.dtype, device=operator.device)
        units[start:stop].fill_diagonal_(1)
        yield start, stop, units
