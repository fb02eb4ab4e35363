"""Second-look checks of the Hessian object: wrong arguments caught before any work, with errors
that say what to do, and the model and random state left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis_helpers import flat_params, loss_at
from helpers import assert_model_unchanged, batches, classification_data, model_snapshot, small_mlp
from hessian_eigenthings import Hessian

F = nn.functional


@pytest.fixture(scope="module")
def problem():
    model = small_mlp(width=6)
    x, y = classification_data(num=60)
    return model, x, y, batches(x, y, [25, 20, 15])


def test_a_grid_of_fewer_than_two_steps_is_refused_before_any_product(problem):
    model, _, _, data = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    d = torch.ones(h.size, dtype=torch.float64)
    before, rng = model_snapshot(model), torch.get_rng_state()
    first = h.operator.num_products
    # one step is a single point at -radius: neither the current parameters nor a curve
    with pytest.raises(ValueError, match="steps must be at least 2"):
        h.landscape_1d(d, steps=1)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        h.landscape_2d((d, -d), steps=1)
    with pytest.raises(ValueError, match="radius must be a positive"):
        h.landscape_1d(d, radius=0.0)
    assert h.operator.num_products == first  # refused before the gradient and the products
    assert_model_unchanged(model, before)
    assert torch.equal(rng, torch.get_rng_state())
    # given steps, the grid's own count is not used
    curve = h.landscape_1d(d, alphas=[0.0, 0.1], steps=1)
    assert curve.losses.shape == (2,)
    # an eigenvector direction: refused before the eigenvectors are computed
    fresh = Hessian(model, data, F.cross_entropy, verbose=False)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        fresh.landscape_1d(0, steps=1)
    assert fresh.eigenpairs is None and fresh.operator.num_products == 0


def test_an_eigenvector_index_beyond_the_solvable_ones_names_the_index(problem):
    model, _, _, data = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    with pytest.raises(ValueError, match=f"eigenvector index {h.size} .* n={h.size}"):
        h.landscape_1d(h.size)
    with pytest.raises(ValueError, match="eigenvector index"):
        h.landscape_2d((0, h.size + 5))
    assert h.eigenpairs is None


def test_2d_takes_the_two_directions_as_rows_of_one_array(problem):
    model, x, y, data = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    gen = torch.Generator().manual_seed(2)
    rows = torch.randn(2, h.size, generator=gen, dtype=torch.float64)
    surface = h.landscape_2d(rows, alphas=[-0.1, 0.2], betas=[0.0, 0.3])
    same = h.landscape_2d(rows.numpy(), alphas=[-0.1, 0.2], betas=[0.0, 0.3])
    _, _, theta = flat_params(model)
    expected = [[loss_at(model, F.cross_entropy, x, y, theta + a * rows[0] + b * rows[1]) for b in (0.0, 0.3)]
                for a in (-0.1, 0.2)]
    assert np.allclose(surface.losses, expected, rtol=1e-12, atol=0)
    assert np.array_equal(same.losses, surface.losses)
    with pytest.raises(TypeError, match="must be a pair"):
        h.landscape_2d(torch.randn(3, h.size, generator=gen, dtype=torch.float64))


def test_pyhessians_keywords_are_named_with_ours(problem):
    model, x, y, _ = problem
    with pytest.raises(TypeError, match="use_gpu="):
        Hessian(model, F.cross_entropy, data=(x, y), cuda=False)
    with pytest.raises(TypeError, match="as loss="):
        Hessian(model, data=(x, y), criterion=F.cross_entropy)


def test_a_list_of_two_batches_as_data_is_refused_not_read_as_one_pair(problem):
    model, x, y, _ = problem
    with pytest.raises(TypeError, match="list of two batches"):
        Hessian(model, F.cross_entropy, data=[(x[:5], y[:5]), (x[5:], y[5:])])
    assert Hessian(model, F.cross_entropy, data=[x, y], verbose=False).size > 0  # a list pair is still one batch


class DictBatchNormNet(nn.Module):
    """Keyword inputs, BatchNorm (analysed in eval mode) and a curved activation."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.bn, self.act, self.l2 = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(self.act(self.bn(self.l1(x))))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dict_inputs_batchnorm_unequal_micro_batches_against_dense_references(reduction):
    torch.manual_seed(3)
    model = DictBatchNormNet().double()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    model.train()  # analysed in eval mode; left in train mode
    x, y = classification_data(num=23, din=4, classes=3, seed=5)
    data = [({"x": xb}, yb) for xb, yb in batches(x, y, [10, 7, 6])]

    def criterion(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction=reduction)

    model.eval()
    names, params, theta = flat_params(model)
    hessian = torch.autograd.functional.hessian(
        lambda flat: criterion(torch.func.functional_call(model, _pieces(flat, names, params), (x,)), y), theta)
    model.train()
    before, rng = model_snapshot(model), torch.get_rng_state()
    h = Hessian(model, data, criterion, max_possible_gpu_samples=4, verbose=False)
    values = h.eigenvalues(2, which="LA").eigenvalues
    assert np.allclose(values, np.linalg.eigvalsh(hessian.numpy())[::-1][:2], rtol=1e-8)
    for row in h.per_layer():
        index = _index_of(row.params, names, params)
        block = hessian[index][:, index]
        assert row.exact and row.top_eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-10)
        assert row.trace == pytest.approx(float(block.trace()), rel=1e-10, abs=1e-13)
        assert row.frobenius == pytest.approx(float(block.norm()), rel=1e-10)
    curve = h.landscape_1d(0, steps=3)
    assert curve.curvature == pytest.approx(values[0], rel=1e-8) and curve.reduction == reduction
    model.eval()
    expected = [float(criterion(torch.func.functional_call(model, _pieces(theta + a * curve.direction, names, params),
                                                           (x,)), y)) for a in curve.alphas]
    model.train()
    assert np.allclose(curve.losses, expected, rtol=1e-12, atol=0)
    assert_model_unchanged(model, before)
    assert torch.equal(rng, torch.get_rng_state())


def _pieces(flat, names, params):
    out, start = {}, 0
    for name, p in zip(names, params):
        out[name] = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def _index_of(group, names, params):
    index, start = [], 0
    for name, p in zip(names, params):
        if name in group:
            index.extend(range(start, start + p.numel()))
        start += p.numel()
    return torch.tensor(index)
