"""The loss's curvature w.r.t. the model outputs: closed forms against automatic differentiation,
factors and random draws against the blocks, and how a plain loss function is classified."""

import pytest
import torch
from torch import nn

from hessian_eigenthings.spectrum.loss_curvature import (
    CrossEntropyCurvature,
    LossCurvature,
    MSECurvature,
    batch_reduction,
    loss_curvature,
)

F = nn.functional


def _dense_blocks(loss_fn, z):
    """Per-row blocks of the full Hessian of loss_fn at z (B, K), by autograd."""
    full = torch.autograd.functional.hessian(loss_fn, z)  # (B, K, B, K)
    rows = torch.arange(z.shape[0])
    return full[rows, :, rows, :]


def _logits(b=6, k=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=gen, dtype=torch.float64), torch.randint(0, k, (b,), generator=gen)


@pytest.mark.parametrize("module", [
    nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss(label_smoothing=0.2),
    nn.CrossEntropyLoss(ignore_index=2), nn.CrossEntropyLoss(ignore_index=2, reduction="sum"),
])
def test_cross_entropy_closed_form(module):
    z, y = _logits()
    def loss_fn(out):
        return module(out, y)
    curvature = loss_curvature(module, loss_fn, z, y)
    assert isinstance(curvature, CrossEntropyCurvature)
    blocks = _dense_blocks(loss_fn, z)
    assert torch.allclose(curvature.blocks(), blocks, atol=1e-14)
    assert torch.allclose(curvature.diagonal(), blocks.diagonal(dim1=1, dim2=2), atol=1e-14)
    columns, signs = curvature.factor()
    assert torch.allclose(torch.einsum("bkr,br,blr->bkl", columns, signs, columns), blocks, atol=1e-14)
    generic = LossCurvature(loss_fn, z)
    assert torch.allclose(generic.blocks(), blocks, atol=1e-14)


@pytest.mark.parametrize("module", [nn.MSELoss(), nn.MSELoss(reduction="sum")])
def test_mse_closed_form(module):
    gen = torch.Generator().manual_seed(1)
    z, t = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 3, generator=gen, dtype=torch.float64)
    def loss_fn(out):
        return module(out, t)
    curvature = loss_curvature(module, loss_fn, z, t)
    assert isinstance(curvature, MSECurvature)
    blocks = _dense_blocks(loss_fn, z)
    assert torch.allclose(curvature.blocks(), blocks, atol=1e-14)
    columns, signs = curvature.factor()
    assert torch.allclose(torch.einsum("bkr,br,blr->bkl", columns, signs, columns), blocks, atol=1e-14)


@pytest.mark.parametrize("kind", ["cross_entropy", "mse", "generic"])
def test_draws_have_the_blocks_as_covariance(kind):
    z, y = _logits(b=3, k=3, seed=2)
    if kind == "cross_entropy":
        module = nn.CrossEntropyLoss()
        curvature = loss_curvature(module, lambda out: module(out, y), z, y)
    elif kind == "mse":
        module, t = nn.MSELoss(), torch.zeros(3, 3, dtype=torch.float64)
        curvature = loss_curvature(module, lambda out: module(out, t), z, t)
    else:
        curvature = LossCurvature(lambda out: (torch.logsumexp(out, dim=1) ** 2).sum(), z)
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([curvature.sample(gen) for _ in range(8000)])  # (S, B, K)
    covariance = torch.einsum("sbk,sbl->bkl", draws, draws) / len(draws)
    blocks = curvature.blocks()
    assert torch.allclose(covariance, blocks, atol=0.06 * float(blocks.abs().max()))


def test_a_loss_that_couples_samples_is_refused():
    z, _ = _logits()
    with pytest.raises(ValueError, match="couples different samples"):
        LossCurvature(lambda out: out.sum() ** 2, z).diagonal()


def test_generic_diagonal_matches_blocks_for_spatial_outputs():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 2, 2), generator=gen)
    def loss_fn(out):
        return F.cross_entropy(out, y)  # per pixel over the class dimension 1
    curvature = loss_curvature(F.cross_entropy, loss_fn, z, y)
    blocks = _dense_blocks(lambda flat: loss_fn(flat.reshape(z.shape)), z.reshape(3, -1))
    assert torch.allclose(curvature.diagonal().reshape(3, -1), blocks.diagonal(dim1=1, dim2=2), atol=1e-14)


@pytest.mark.parametrize("criterion, expected", [
    (nn.CrossEntropyLoss(reduction="sum"), "sum"),
    (F.cross_entropy, "mean"),
    (lambda o, t: F.cross_entropy(o, t, reduction="sum"), "sum"),
    (lambda o, t: F.mse_loss(o, F.one_hot(t, 4).double()), "mean"),
])
def test_reduction_of_a_batch(criterion, expected):
    z, y = _logits()
    assert batch_reduction(criterion, z, y) == expected


def test_a_loss_that_is_neither_mean_nor_sum_is_refused():
    z, y = _logits()
    with pytest.raises(ValueError, match="neither a mean nor a sum"):
        batch_reduction(lambda o, t: F.cross_entropy(o, t, reduction="sum") ** 2, z, y)
