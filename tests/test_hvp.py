"""HVPOperator against exact Hessians: dense autograd Hessians and closed forms."""

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import HVPOperator
from helpers import batches, classification_data, dense_loss_hessian, small_mlp

F = nn.functional


def test_full_dataset_product_is_hessian_of_mean_loss_with_uneven_batches(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    assert [len(b[1]) for b in loader] == [500, 12]
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    assert op.size == hessian.shape[0] and op.dtype == torch.float64
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(op.size, generator=gen, dtype=torch.float64)
    expected = hessian @ v
    got = op.apply(v)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12 * expected.abs().max())
    assert op.num_samples == 512
    # An unweighted average of the two batch Hessians would be far off: the weighting matters.
    h_a = dense_loss_hessian(model, F.cross_entropy, *loader[0])
    h_b = dense_loss_hessian(model, F.cross_entropy, *loader[1])
    assert (((h_a + h_b) / 2) @ v - expected).norm() > 1e-3 * expected.norm()


@pytest.mark.parametrize("micro", [1, 5, 7, 12, 64, 256, 499, 500, 501, 10_000])
def test_micro_batching_gives_the_same_product(mlp_problem, micro):
    model, loader, _, _, hessian = mlp_problem
    whole = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=10**9)
    split = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=micro)
    v = torch.randn(whole.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = whole.apply(v), split.apply(v)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-13 * a.abs().max())
    assert torch.allclose(b, hessian @ v, rtol=1e-9, atol=1e-12 * a.abs().max())


def test_block_product_matches_columns(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    block = torch.randn(op.size, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = op.apply_block(block)
    assert got.shape == (op.size, 5)
    assert torch.allclose(got, hessian @ block, rtol=1e-10, atol=1e-12 * got.abs().max())
    assert torch.allclose(op @ block[:, 2], got[:, 2], rtol=1e-12, atol=1e-14)
    assert op.num_products == 6


def test_linear_least_squares_closed_form():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(300, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(6, 1).double()
    op = HVPOperator(model, batches(x, y, [128, 128, 44]), F.mse_loss, use_gpu=False, max_possible_gpu_samples=50)
    design = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], dim=1)  # weight then bias
    exact = 2 * design.T @ design / 300
    dense = op.apply_block(torch.eye(7, dtype=torch.float64))
    assert torch.allclose(dense, exact, rtol=1e-12, atol=1e-13)


def test_logistic_regression_closed_form():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    y = (torch.rand(200, 1, generator=gen) > 0.5).double()
    model = nn.Linear(4, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 0.3, 2.0]], dtype=torch.float64))
        model.bias.fill_(0.2)
    op = HVPOperator(model, batches(x, y, [64, 64, 64, 8]), F.binary_cross_entropy_with_logits, use_gpu=False)
    design = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], dim=1)
    p = torch.sigmoid(design @ torch.tensor([0.5, -1.0, 0.3, 2.0, 0.2], dtype=torch.float64))
    exact = (design * (p * (1 - p)).unsqueeze(1)).T @ design / 200
    dense = op.apply_block(torch.eye(5, dtype=torch.float64))
    assert (dense - exact).abs().max() <= 1e-12 * exact.abs().max()


def test_parameter_subset_by_name_prefix_and_tensor(mlp_problem):
    model, loader, x, y, _ = mlp_problem
    names = ["2.weight", "4.bias"]
    sub_hessian = dense_loss_hessian(model, F.cross_entropy, x, y, names=names)
    by_name = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, params=names)
    by_tensor = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, params=[model[4].bias, model[2].weight])
    assert by_name.param_names == names and by_tensor.param_names == names  # model order, not given order
    v = torch.randn(by_name.size, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for op in (by_name, by_tensor):
        assert torch.allclose(op.apply(v), sub_hessian @ v, rtol=1e-10, atol=1e-13)
    prefix = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, params="2")
    assert prefix.param_names == ["2.weight", "2.bias"]


class _WithExtras(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 2).double()
        self.unused = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)

    def forward(self, x):
        return self.body(x) * self.frozen


def test_unused_parameters_give_zeros_and_frozen_ones_are_left_out():
    model = _WithExtras()
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(40, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (40,), generator=gen)
    op = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False)
    assert op.param_names == ["unused", "body.weight", "body.bias"]  # named_parameters() order
    assert op.size == 4 + 6 + 2
    out = op.apply(torch.ones(op.size, dtype=torch.float64))
    assert torch.all(out[:4] == 0)
    exact = dense_loss_hessian(model, F.cross_entropy, x, y, names=["body.weight", "body.bias"])
    assert torch.allclose(out[4:], exact @ torch.ones(8, dtype=torch.float64), rtol=1e-11, atol=1e-14)


def test_loss_linear_in_parameters_gives_zero_curvature():
    model = nn.Linear(3, 1, bias=False).double()
    data = [(torch.randn(10, 3, dtype=torch.float64), torch.zeros(10, 1, dtype=torch.float64))]
    op = HVPOperator(model, data, lambda out, _: out.mean(), use_gpu=False)
    assert torch.equal(op.apply(torch.ones(3, dtype=torch.float64)), torch.zeros(3, dtype=torch.float64))


def test_stochastic_mode_cycles_through_batches(mlp_problem):
    model, loader, _, _, _ = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, full_dataset=False)
    assert op.is_stochastic
    exact = [dense_loss_hessian(model, F.cross_entropy, *batch) for batch in loader]
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for step in range(5):
        expected = exact[step % 2] @ v
        assert torch.allclose(op.apply(v), expected, rtol=1e-10, atol=1e-13 * expected.abs().max())


def test_batch_formats_tuple_inputs_and_dict():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2).double()
            self.b = nn.Linear(2, 2).double()

        def forward(self, u, w):
            return torch.tanh(self.a(u)) + self.b(w)

    model = TwoInputs()
    gen = torch.Generator().manual_seed(9)
    u, w = torch.randn(30, 3, generator=gen, dtype=torch.float64), torch.randn(30, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (30,), generator=gen)
    v = torch.randn(14, generator=gen, dtype=torch.float64)
    tuple_op = HVPOperator(model, [((u, w), y)], F.cross_entropy, use_gpu=False, max_possible_gpu_samples=7)
    dict_op = HVPOperator(model, [({"u": u, "w": w}, y)], F.cross_entropy, use_gpu=False)
    assert torch.allclose(tuple_op.apply(v), dict_op.apply(v), rtol=1e-11, atol=1e-14)


def test_float32_model_gives_float32_operator_close_to_float64():
    model64 = small_mlp(seed=3)
    model32 = small_mlp(seed=3, dtype=torch.float32)
    x, y = classification_data(num=256)
    op64 = HVPOperator(model64, [(x, y)], F.cross_entropy, use_gpu=False)
    op32 = HVPOperator(model32, [(x.float(), y)], F.cross_entropy, use_gpu=False)
    assert op32.dtype == torch.float32
    v = torch.randn(op64.size, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    a, b = op64.apply(v), op32.apply(v.float()).double()
    assert (a - b).norm() <= 1e-5 * a.norm()


def test_fp16_autocast_is_close_but_not_exact(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    model32 = small_mlp(dtype=torch.float32)
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    data = [(x.float(), y) for x, y in loader]
    op = HVPOperator(model32, data, F.cross_entropy, use_gpu=False, fp16=True)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(11))
    exact = (hessian @ v.double()).float()
    got = op.apply(v)
    assert got.dtype == torch.float32
    assert (got - exact).norm() <= 0.1 * exact.norm()


def test_to_scipy_is_float64_and_costs_no_probe(mlp_problem):
    from scipy.sparse.linalg import LinearOperator

    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    lin = op.to_scipy()
    assert isinstance(lin, LinearOperator) and lin.dtype == np.float64 and lin.shape == (op.size, op.size)
    assert op.num_products == 0
    v = np.random.default_rng(0).standard_normal(op.size)
    out = lin.matvec(v)
    assert out.dtype == np.float64 and out.shape == (op.size,)
    assert np.allclose(out, hessian.numpy() @ v, rtol=1e-10, atol=1e-12)
    block = lin.matmat(np.stack([v, 2 * v], axis=1))
    assert np.allclose(block[:, 1], 2 * out, rtol=1e-10, atol=1e-12)


def test_unflatten_and_parameters_vector(mlp_problem):
    model, loader, _, _, _ = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    flat = op.parameters_vector()
    pieces = op.unflatten(flat)
    for name, p in model.named_parameters():
        assert torch.equal(pieces[name], p.detach())
