"""The contract of ModelOperator: a new curvature operator implements build() and product() for
one micro-batch and gets the data loop, reductions, kept work, checks and guarantees for free."""

import math
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from hessian_eigenthings import NonFiniteError, thick_restart_lanczos
from hessian_eigenthings.operators.model_operator import ModelOperator
from helpers import assert_model_unchanged, batches, classification_data, model_snapshot, small_mlp

F = nn.functional


class _Gradient(NamedTuple):
    loss: Tensor
    gradient: Tensor


class BatchGradientOuterProduct(ModelOperator):
    """``sum_b (B_b / N) g_b g_b^T`` for the gradients ``g_b`` of the batch losses: a toy curvature."""

    builds = 0

    def build(self, inputs, targets, label):
        type(self).builds += 1
        loss = self._loss(inputs, targets, label)
        pieces = torch.autograd.grad(loss, self._params)
        return _Gradient(loss, torch.cat([p.reshape(-1) for p in pieces]))

    def work_bytes(self, work):
        return work.gradient.numel() * work.gradient.element_size()

    def product(self, work, tangents, keep):
        return work.gradient[:, None] * (work.gradient @ tangents.block)[None, :]


def reference(model, loader, criterion=F.cross_entropy):
    total, count = 0, 0
    for x, y in loader:
        g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(criterion(model(x), y), list(model.parameters()))])
        total = total + len(x) * torch.outer(g, g)
        count += len(x)
    return total / count


def test_a_new_operator_needs_only_build_and_product():
    model = small_mlp(seed=3, width=6)
    x, y = classification_data(num=70, seed=3)
    loader = batches(x, y, [30, 25, 15])
    exact = reference(model, loader)
    before = model_snapshot(model)
    op = BatchGradientOuterProduct(model, loader, F.cross_entropy, use_gpu=False)
    block = torch.randn(op.size, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(op.apply_block(block), exact @ block, rtol=1e-10, atol=1e-14)
    # inside frozen() the base keeps each micro-batch's work: built once, reused by later products
    BatchGradientOuterProduct.builds = 0
    with op.frozen():
        for step in range(3):
            assert torch.allclose(op.apply(block[:, step]), exact @ block[:, step], rtol=1e-10, atol=1e-14)
        assert len(op._keeper) == 3
    assert BatchGradientOuterProduct.builds == 3 and len(op._keeper) == 0
    # solvers work on it: its one non-zero direction is rank one per batch
    result = thick_restart_lanczos(op, 1, tol=1e-8, verbose=False)
    assert result.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(exact)[-1]), rel=1e-7)
    assert_model_unchanged(model, before)


def test_the_base_checks_the_new_operators_losses_and_sums_its_products():
    model = small_mlp(seed=4, width=6)
    x, y = classification_data(num=40, seed=4)
    bad = x.clone()
    bad[23, 0] = math.nan
    op = BatchGradientOuterProduct(model, [(x[:20], y[:20]), (bad[20:], y[20:])], F.cross_entropy, use_gpu=False)
    with pytest.raises(NonFiniteError, match="batch 1"):
        op.apply(torch.ones(op.size, dtype=torch.float64))
    summed = BatchGradientOuterProduct(model, batches(x, y, [20, 20]), nn.CrossEntropyLoss(reduction="sum"),
                                       use_gpu=False)
    loss = nn.CrossEntropyLoss(reduction="sum")
    expected = sum((lambda g: torch.outer(g, g))(torch.cat([p.reshape(-1) for p in torch.autograd.grad(
        loss(model(bx), by), list(model.parameters()))])) for bx, by in batches(x, y, [20, 20]))
    v = torch.ones(summed.size, dtype=torch.float64)
    assert torch.allclose(summed.apply(v), expected @ v, rtol=1e-10)
