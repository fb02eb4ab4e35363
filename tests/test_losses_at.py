"""ModelOperator.losses_at (the loss at other parameter values, without writing them into the model),
ModelOperator.share_batches (two operators reading the dataloader once), and the empirical
Fisher's loss and gradient for a summing criterion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis_helpers import CountingLoader, flat_params, loss_at
from helpers import assert_model_unchanged, batches, classification_data, model_snapshot, small_mlp
from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator, HVPOperator

F = nn.functional


@pytest.fixture
def problem():
    model = small_mlp(width=8)
    x, y = classification_data(num=150)
    return model, x, y, batches(x, y, [64, 64, 22])


def test_losses_at_equal_the_loss_at_each_point_mean_and_sum(problem):
    model, x, y, data = problem
    _, _, theta = flat_params(model)
    gen = torch.Generator().manual_seed(0)
    points = theta.unsqueeze(1) + 0.3 * torch.randn(theta.numel(), 4, generator=gen, dtype=torch.float64)
    points[:, 0] = theta
    for criterion in (F.cross_entropy, nn.CrossEntropyLoss(reduction="sum")):
        op = HVPOperator(model, data, criterion, use_gpu=False, max_possible_gpu_samples=40)
        before = model_snapshot(model)
        got = op.losses_at(points)
        assert_model_unchanged(model, before)
        assert got.dtype == torch.float64 and got.shape == (4,)
        expected = torch.tensor([loss_at(model, criterion, x, y, points[:, j]) for j in range(4)], dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=1e-12, atol=0)
        loss0, _ = op.loss_and_gradient()
        assert got[0].item() == pytest.approx(loss0, rel=1e-13)


def test_losses_at_of_a_parameter_block_keep_the_other_parameters(problem):
    model, x, y, data = problem
    names, params, theta = flat_params(model)
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False, params=["4"])
    block = op.parameters_vector()
    shifted = (block + 0.5).unsqueeze(1)
    full = theta.clone()
    full[-block.numel():] += 0.5  # "4" holds the last parameters of the model
    assert op.losses_at(shifted).item() == pytest.approx(loss_at(model, F.cross_entropy, x, y, full), rel=1e-12)


def test_losses_at_with_dropout_in_train_mode_see_one_mask_per_pass_and_keep_rng():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)).double().train()
    x, y = classification_data(num=40)
    op = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, eval_mode=False)
    theta = op.parameters_vector()
    rng = torch.get_rng_state()
    same = op.losses_at(torch.stack([theta, theta, theta], dim=1))
    assert torch.equal(torch.get_rng_state(), rng)
    assert same[0] == same[1] == same[2]  # the same dropout masks at every point
    assert same[0].item() == pytest.approx(op.loss_and_gradient()[0], rel=1e-13)  # and those of the products
    assert model.training


def test_losses_at_refuse_a_wrong_block_and_return_non_finite_values(problem):
    model, _, _, data = problem
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    with pytest.raises(ValueError, match="block of shape"):
        op.losses_at(torch.zeros(op.size + 1, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        op.losses_at(torch.zeros(op.size, 2, dtype=torch.float32))
    assert op.losses_at(torch.zeros(op.size, 0, dtype=torch.float64)).shape == (0,)
    broken = op.parameters_vector().unsqueeze(1).repeat(1, 2)
    broken[0, 1] = float("nan")
    losses = op.losses_at(broken)
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1])


def test_losses_at_name_a_criterion_that_returns_no_scalar(problem):
    model, _, _, data = problem
    op = HVPOperator(model, data, lambda out, t: F.cross_entropy(out, t, reduction="none"), use_gpu=False,
                     reduction="mean")
    with pytest.raises(ValueError, match="scalar"):
        op.losses_at(op.parameters_vector().unsqueeze(1))


def test_fisher_loss_and_gradient_of_a_summing_criterion_are_the_sum(problem):
    model, x, y, data = problem
    criterion = nn.CrossEntropyLoss(reduction="sum")
    reference = HVPOperator(model, data, criterion, use_gpu=False).loss_and_gradient()
    for cls in (EmpiricalFisherOperator, GGNOperator):
        loss, grad = cls(model, data, criterion, use_gpu=False).loss_and_gradient()
        assert loss == pytest.approx(reference[0], rel=1e-12)
        assert torch.allclose(grad, reference[1], rtol=1e-10, atol=1e-12)
    assert reference[0] == pytest.approx(float(criterion(model(x), y).detach()), rel=1e-12)


def test_shared_batches_read_the_dataloader_once_for_both_operators(problem):
    model, _, _, data = problem
    loader = CountingLoader(data)
    hvp = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    ggn = GGNOperator(model, hvp.dataloader, F.cross_entropy, use_gpu=False)
    ggn.share_batches(hvp)
    alone = GGNOperator(model, data, F.cross_entropy, use_gpu=False)
    v = torch.randn(hvp.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hvp.apply(v)
    assert torch.allclose(ggn.apply(v), alone.apply(v), rtol=1e-12, atol=1e-14)
    ggn.apply(v)
    assert loader.iterations == 1 and loader.batches_read == len(data)
    ggn.clear_batch_cache()  # clears the shared copies: the next product of either reads again
    hvp.apply(v)
    assert loader.iterations == 2


def test_share_batches_refuses_operators_that_read_differently(problem):
    model, _, _, data = problem
    hvp = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    with pytest.raises(ValueError, match="dataloader"):
        GGNOperator(model, list(data), F.cross_entropy, use_gpu=False).share_batches(hvp)
    with pytest.raises(ValueError, match="max_possible_gpu_samples"):
        GGNOperator(model, data, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=7).share_batches(hvp)
    with pytest.raises(ValueError, match="mini-batches"):
        HVPOperator(model, data, F.cross_entropy, use_gpu=False, full_dataset=False).share_batches(
            HVPOperator(model, data, F.cross_entropy, use_gpu=False, full_dataset=False))
    with pytest.raises(TypeError, match="model operator"):
        hvp.share_batches(object())
