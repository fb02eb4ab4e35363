"""PLACEHOLDER, to be replaced at merge by the real completion of repeated eigenvalues.

This file only fixes the interface that the solvers' shared finish calls: it returns its inputs
unchanged (no products, nothing missed). It is given no residuals, so it returns NaN for them; the
shared finish keeps the solver's own pairs and residuals whenever nothing was missed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..operators.base import Operator


@dataclass
class Completion:
    """The top-k pairs after the check: values (k,), vectors (n, k), residuals (k,) tensors,
    the products the check used, and how many copies of eigenvalues the solver had missed."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    num_products: int
    missed: int


def complete_multiplicities(
    op: Operator, values: Tensor, vectors: Tensor, which: str, tol: float, seed: Optional[int]
) -> Completion:
    """PLACEHOLDER: returns the pairs as given. ``values`` (k,) ordered as ``which`` says, ``vectors``
    (n, k) orthonormal columns on the operator's device and dtype."""
    return Completion(values, vectors, torch.full_like(values, float("nan")), 0, 0)
