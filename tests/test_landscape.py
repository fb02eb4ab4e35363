"""Loss landscapes: the losses against direct evaluation at perturbed parameters, the quadratic
model's slope and curvature against autograd and the dense Hessian, filter-normalised directions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis_helpers import dense_ggn_cross_entropy, flat_params, loss_at
from helpers import assert_model_unchanged, batches, classification_data, dense_loss_hessian, exact_top, \
    model_snapshot, small_mlp
from hessian_eigenthings import HVPOperator, Hessian, Landscape1D, Landscape2D, filter_normalized_direction
from hessian_eigenthings.analysis import landscape_1d, landscape_2d

F = nn.functional


@pytest.fixture(scope="module")
def problem():
    model = small_mlp(width=8)
    x, y = classification_data(num=120)
    data = batches(x, y, [50, 50, 20])
    return model, x, y, data, dense_loss_hessian(model, F.cross_entropy, x, y)


def gradient(model: nn.Module, criterion, x, y) -> torch.Tensor:
    loss = criterion(model(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


def test_1d_losses_slope_and_curvature_are_exact(problem):
    model, x, y, data, hessian = problem
    _, _, theta = flat_params(model)
    d = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    h = Hessian(model, data, F.cross_entropy, max_possible_gpu_samples=32, verbose=False)
    before = model_snapshot(model)
    alphas = np.linspace(-0.3, 0.5, 9)
    curve = h.landscape_1d(d, alphas=alphas)
    assert_model_unchanged(model, before)
    assert isinstance(curve, Landscape1D) and curve.label == "your direction" and curve.eigenvalue is None
    expected = [loss_at(model, F.cross_entropy, x, y, theta + a * d) for a in alphas]
    assert np.allclose(curve.losses, expected, rtol=1e-12, atol=0)
    assert curve.loss0 == pytest.approx(loss_at(model, F.cross_entropy, x, y, theta), rel=1e-13)
    assert curve.slope == pytest.approx(float(gradient(model, F.cross_entropy, x, y) @ d), rel=1e-10)
    assert curve.curvature == pytest.approx(float(d @ hessian @ d), rel=1e-10)
    assert np.allclose(curve.quadratic(), curve.loss0 + alphas * curve.slope + 0.5 * alphas**2 * curve.curvature)
    # the model agrees with the loss to second order: the error over alpha^2 vanishes as alpha -> 0
    small = h.landscape_1d(d, alphas=[1e-3, 2e-3])
    errors = np.abs(small.losses - small.quadratic())
    assert errors[1] / errors[0] == pytest.approx(8, rel=0.05)  # third order
    assert curve.reduction == "mean" and curve.info["num_products"] == 1 and curve.info["points"] == 9


def test_1d_along_the_top_eigenvector_by_default(problem):
    model, x, y, data, hessian = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    curve = h.landscape_1d(steps=7)
    top_value, top_vector = exact_top(hessian, 1, "LA")
    assert curve.eigenvalue == pytest.approx(top_value[0], rel=1e-9)
    assert curve.curvature == pytest.approx(top_value[0], rel=1e-8)  # d^T H d of a unit eigenvector
    assert abs(float(curve.direction @ torch.as_tensor(top_vector[0]))) == pytest.approx(1.0, abs=1e-8)
    assert curve.label.startswith("eigenvector 0 (lambda=")
    # default radius: the curvature term reaches four times the loss at the ends
    radius = curve.alphas[-1]
    assert curve.alphas[0] == -radius and len(curve.alphas) == 7
    assert 0.5 * curve.curvature * radius**2 == pytest.approx(4 * curve.loss0, rel=1e-12)
    expected = [loss_at(model, F.cross_entropy, x, y, flat_params(model)[2] + a * curve.direction)
                for a in curve.alphas]
    assert np.allclose(curve.losses, expected, rtol=1e-12)
    # eigenvector index 1 reuses the held pairs when there are enough, and solves again otherwise
    products = h.operator.num_products
    h.eigenvalues(3, which="LA")
    solve = h.operator.num_products - products
    second = h.landscape_1d(1, steps=3)
    assert h.operator.num_products - products == solve + 1  # no new solve; one product for d^T H d
    assert second.eigenvalue == pytest.approx(exact_top(hessian, 2, "LA")[0][1], rel=1e-9)


def test_summed_loss_landscape_is_the_sum(problem):
    model, x, y, data, _ = problem
    criterion = nn.CrossEntropyLoss(reduction="sum")
    _, _, theta = flat_params(model)
    d = torch.ones_like(theta) / theta.numel() ** 0.5
    curve = Hessian(model, data, criterion, verbose=False).landscape_1d(d, alphas=[-1.0, 0.0, 2.0])
    expected = [loss_at(model, criterion, x, y, theta + a * d) for a in (-1.0, 0.0, 2.0)]
    assert curve.reduction == "sum" and np.allclose(curve.losses, expected, rtol=1e-12)
    summed = dense_loss_hessian(model, criterion, x, y)
    assert curve.curvature == pytest.approx(float(d @ summed @ d), rel=1e-10)


def test_2d_grid_and_quadratic_model_are_exact(problem):
    model, x, y, data, hessian = problem
    _, _, theta = flat_params(model)
    gen = torch.Generator().manual_seed(7)
    d1, d2 = (torch.randn(theta.numel(), generator=gen, dtype=torch.float64) for _ in range(2))
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    alphas, betas = np.array([-0.2, 0.0, 0.3]), np.array([-0.1, 0.25])
    surface = h.landscape_2d((d1, d2), alphas=alphas, betas=betas)
    assert isinstance(surface, Landscape2D) and surface.losses.shape == (3, 2)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            direct = loss_at(model, F.cross_entropy, x, y, theta + a * d1 + b * d2)
            assert surface.losses[i, j] == pytest.approx(direct, rel=1e-12)
    directions = torch.stack([d1, d2])
    assert np.allclose(surface.curvatures, (directions @ hessian @ directions.T).numpy(), rtol=1e-10)
    assert np.allclose(surface.slopes, (directions @ gradient(model, F.cross_entropy, x, y)).detach().numpy(),
                       rtol=1e-10)
    c = surface.curvatures
    aa, bb = np.meshgrid(alphas, betas, indexing="ij")
    model_values = (surface.loss0 + aa * surface.slopes[0] + bb * surface.slopes[1]
                    + 0.5 * (c[0, 0] * aa**2 + 2 * c[0, 1] * aa * bb + c[1, 1] * bb**2))
    assert np.allclose(surface.quadratic(), model_values, rtol=1e-14)
    assert surface.eigenvalues is None and surface.labels == ("your direction", "your direction")


def test_2d_default_is_the_top_two_eigenvectors_each_with_its_radius(problem):
    model, _, _, data, hessian = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    surface = h.landscape_2d(steps=5)
    top = exact_top(hessian, 2, "LA")[0]
    assert np.allclose(surface.eigenvalues, top, rtol=1e-9)
    assert np.allclose(np.diag(surface.curvatures), top, rtol=1e-8)
    assert abs(surface.curvatures[0, 1]) < 1e-6 * top[0]  # eigenvectors: no cross term
    for steps, value in ((surface.alphas, top[0]), (surface.betas, top[1])):
        assert 0.5 * value * steps[-1] ** 2 == pytest.approx(4 * surface.loss0, rel=1e-6)


def test_ggn_view_uses_the_gauss_newton_curvature(problem):
    model, x, y, data, _ = problem
    _, _, theta = flat_params(model)
    d = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    curve = Hessian(model, data, F.cross_entropy, verbose=False).ggn().landscape_1d(d, alphas=[0.0, 0.1])
    ggn = dense_ggn_cross_entropy(model, x, y)
    assert curve.curvature_kind == "ggn" and curve.curvature == pytest.approx(float(d @ ggn @ d), rel=1e-10)
    assert curve.losses[1] == pytest.approx(loss_at(model, F.cross_entropy, x, y, theta + 0.1 * d), rel=1e-12)


def test_filter_normalised_directions(problem):
    model, _, _, data, _ = problem
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    rng = torch.get_rng_state()
    d = filter_normalized_direction(op, seed=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(d, filter_normalized_direction(op, seed=3))
    assert not torch.equal(d, filter_normalized_direction(op, seed=4))
    pieces, params = op.unflatten(d), dict(model.named_parameters())
    for name, piece in pieces.items():
        if piece.dim() >= 2:  # every filter (row) has the norm of the parameter's row
            assert torch.allclose(piece.norm(dim=1), params[name].detach().norm(dim=1), rtol=1e-12)
        else:
            assert torch.count_nonzero(piece) == 0
    copied = op.unflatten(filter_normalized_direction(op, seed=3, biases="copy"))
    assert torch.equal(copied["0.bias"], params["0.bias"].detach())
    assert torch.equal(copied["0.weight"], pieces["0.weight"])
    with pytest.raises(ValueError, match="biases"):
        filter_normalized_direction(op, biases="keep")


def test_random_directions_in_the_object_get_radius_one_and_their_own_seeds(problem):
    model, _, _, data, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    surface = h.landscape_2d(("random", "random"), steps=3, seed=10)
    assert np.allclose(surface.alphas, [-1, 0, 1]) and np.allclose(surface.betas, [-1, 0, 1])
    assert torch.equal(surface.directions[0], filter_normalized_direction(h.operator, seed=10))
    assert torch.equal(surface.directions[1], filter_normalized_direction(h.operator, seed=11))
    assert surface.labels[0] == "random direction (filter-normalised)"


def test_eval_mode_landscape_of_a_model_with_batchnorm_and_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.4), nn.Linear(12, 3))
    model = model.double().train()
    x, y = classification_data(num=60, classes=3)
    with torch.no_grad():
        model(x)  # running statistics that differ from the batch's
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    curve = Hessian(model, [(x, y)], F.cross_entropy, verbose=False).landscape_1d(
        "random", alphas=[0.0, 0.5], biases="copy")
    assert_model_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    _, _, theta = flat_params(model)
    for a, value in zip((0.0, 0.5), curve.losses):  # eval mode: running statistics, no dropout
        assert value == pytest.approx(loss_at(model, F.cross_entropy, x, y, theta + a * curve.direction), rel=1e-12)
    assert model.training


def test_module_functions_take_any_model_operator(problem):
    model, x, y, data, _ = problem
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    _, _, theta = flat_params(model)
    d = torch.ones_like(theta)
    curve = landscape_1d(op, d.numpy(), [0.0, 0.01], verbose=False)
    assert curve.losses[1] == pytest.approx(loss_at(model, F.cross_entropy, x, y, theta + 0.01 * d), rel=1e-12)
    surface = landscape_2d(op, torch.stack([d, -d]), [0.1], [0.1], verbose=False)
    assert surface.losses[0, 0] == pytest.approx(curve.loss0, rel=1e-12)  # d - d = 0


def test_bad_directions_and_steps_get_clear_errors(problem):
    model, _, _, data, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    n = h.size
    with pytest.raises(ValueError, match="zero vector"):
        h.landscape_1d(torch.zeros(n, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"length n={n}"):
        h.landscape_1d(torch.ones(n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        h.landscape_1d(torch.full((n,), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor or numpy array"):
        h.landscape_1d([1.0] * n)
    with pytest.raises(ValueError, match="alphas must be a 1-D"):
        h.landscape_1d("random", alphas=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="radius must be a positive"):
        h.landscape_1d("random", radius=-1.0)
    with pytest.raises(ValueError, match="steps must be a positive"):
        h.landscape_1d("random", steps=0)
    with pytest.raises(ValueError, match="not known"):
        h.landscape_1d("sharpest")
    with pytest.raises(ValueError, match=">= 0"):
        h.landscape_1d(-1)
    with pytest.raises(TypeError, match="must be a pair"):
        h.landscape_2d(("random",))
    with pytest.raises(TypeError, match="must be a pair"):
        h.landscape_2d("random")


def test_plots(problem, tmp_path):
    pytest.importorskip("matplotlib")
    model, _, _, data, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    curve = h.landscape_1d(steps=5)
    fig = curve.plot(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    ax = fig.axes[0]
    assert np.allclose(ax.lines[0].get_ydata(), curve.losses)
    assert np.allclose(ax.lines[1].get_ydata(), curve.quadratic(ax.lines[1].get_xdata()))
    surface = h.landscape_2d(steps=4)
    surface.plot(tmp_path / "surface.png")
    assert (tmp_path / "surface.png").read_bytes()[:4] == b"\x89PNG"
    surface.losses[:] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        surface.plot()
