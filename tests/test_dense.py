"""Dense Hessians of small models against autograd references and closed forms."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from hessian_eigenthings import (
    HVPOperator,
    LambdaOperator,
    MatrixOperator,
    dense_eigenthings,
    dense_matrix,
    lanczos,
    loss_hessian,
    output_hessian,
)
from hessian_eigenthings.spectrum import split_by_parameter
from helpers import (
    assert_model_unchanged,
    batches,
    classification_data,
    dense_loss_hessian,
    exact_top,
    model_snapshot,
    planted_matrix,
)

F = nn.functional


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


class TwoInTwoOut(nn.Module):
    """model(x, z) -> (logits (B, 2), {"energy": (B,)}): several inputs and outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4, bias=False)
        self.head = nn.Linear(4, 2)
        self.energy = nn.Linear(4, 1)

    def forward(self, x, z):
        h = torch.tanh(self.a(x) + self.b(z))
        return self.head(h), {"energy": self.energy(h).squeeze(-1) ** 2}


def flat_params(model):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    return names, params, torch.cat([p.detach().reshape(-1) for p in params])


def reference_output_hessian(model, inputs, select):
    """Hessian of each output entry, one autograd.functional.hessian per entry (slow, obvious)."""
    names, params, flat0 = flat_params(model)

    def entry(flat, index):
        pieces, start = {}, 0
        for name, p in zip(names, params):
            pieces[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return select(functional_call(model, pieces, inputs)).reshape(-1)[index]

    count = select(model(*inputs)).numel()
    return torch.stack([torch.autograd.functional.hessian(lambda f: entry(f, i), flat0) for i in range(count)])


def test_loss_hessian_equals_autograd_with_uneven_batches_and_micro_batches():
    model = tiny_mlp()
    x, y = classification_data(num=50, din=4, classes=3, seed=1)
    exact = dense_loss_hessian(model, F.cross_entropy, x, y)
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = model_snapshot(model)
    got = loss_hessian(model, batches(x, y, [20, 20, 10]), F.cross_entropy, use_gpu=False,
                       max_possible_gpu_samples=7, block_size=9, verbose=False)
    assert_model_unchanged(model, before)
    assert got.shape == (51, 51) and got.dtype == torch.float64
    assert torch.allclose(got, exact, rtol=1e-11, atol=1e-13)
    assert torch.allclose(got, got.T, atol=1e-13)


def test_least_squares_closed_form():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(90, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(90, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(5, 1).double()
    design = torch.cat([x, torch.ones(90, 1, dtype=torch.float64)], dim=1)
    h = loss_hessian(model, batches(x, y, [64, 26]), F.mse_loss, use_gpu=False, verbose=False)
    assert torch.allclose(h, 2 * design.T @ design / 90, rtol=1e-12, atol=1e-13)


def test_blocks_by_parameter_and_parameter_subsets():
    model = tiny_mlp(1)
    x, y = classification_data(num=30, din=4, classes=3, seed=2)
    loader = [(x, y)]
    full = loss_hessian(model, loader, F.cross_entropy, use_gpu=False, verbose=False)
    blocks = loss_hessian(model, loader, F.cross_entropy, use_gpu=False, by_parameter=True, verbose=False)
    names = [n for n, _ in model.named_parameters()]
    assert list(blocks) == names and all(list(row) == names for row in blocks.values())
    assert blocks["0.weight"]["2.weight"].shape == (6, 4, 3, 6)
    assert blocks["2.bias"]["0.bias"].shape == (3, 6)
    # block (0.weight, 2.weight) is rows 0:24, columns 30:48 of the full matrix
    assert torch.equal(blocks["0.weight"]["2.weight"].reshape(24, 18), full[:24, 30:48])
    assert torch.equal(blocks["2.bias"]["2.bias"], full[48:, 48:])
    sub = loss_hessian(model, loader, F.cross_entropy, use_gpu=False, params=["2.weight", "0.bias"], verbose=False)
    idx = torch.cat([torch.arange(24, 30), torch.arange(30, 48)])
    assert torch.allclose(sub, full[idx][:, idx], rtol=1e-12, atol=1e-14)


def test_output_hessian_of_a_single_output_model():
    model = tiny_mlp(2)
    x, _ = classification_data(num=3, din=4, classes=3, seed=3)
    model.train()
    before = model_snapshot(model)
    got = output_hessian(model, x)
    assert_model_unchanged(model, before)
    assert got.shape == (3, 3, 51, 51)
    ref = reference_output_hessian(model, (x,), lambda out: out).reshape(3, 3, 51, 51)
    assert torch.allclose(got, ref, rtol=1e-11, atol=1e-13)
    # the last layer is linear in its own weights: the (2.weight, 2.weight) block is zero
    assert torch.all(got[..., 30:, 30:] == 0)


def test_output_hessian_with_several_inputs_and_outputs():
    torch.manual_seed(3)
    model = TwoInTwoOut().double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(2, 2, generator=gen, dtype=torch.float64)
    n = sum(p.numel() for p in model.parameters())
    got = output_hessian(model, (x, z))
    assert isinstance(got, tuple) and isinstance(got[1], dict)
    assert got[0].shape == (2, 2, n, n) and got[1]["energy"].shape == (2, n, n)
    ref_logits = reference_output_hessian(model, (x, z), lambda out: out[0]).reshape(2, 2, n, n)
    ref_energy = reference_output_hessian(model, (x, z), lambda out: out[1]["energy"]).reshape(2, n, n)
    assert torch.allclose(got[0], ref_logits, rtol=1e-11, atol=1e-13)
    assert torch.allclose(got[1]["energy"], ref_energy, rtol=1e-11, atol=1e-13)
    # a dict of inputs calls model(**inputs); blocks by parameter keep the output's leading shape
    blocks = output_hessian(model, {"x": x, "z": z}, by_parameter=True, params=["a", "head"])
    assert set(blocks[1]["energy"]) == {"a.weight", "a.bias", "head.weight", "head.bias"}
    assert blocks[0]["a.weight"]["head.bias"].shape == (2, 2, 4, 3, 2)
    assert blocks[1]["energy"]["a.bias"]["a.bias"].shape == (2, 4, 4)
    assert torch.allclose(blocks[1]["energy"]["a.bias"]["a.bias"], ref_energy[:, 12:16, 12:16], atol=1e-13)


def test_memory_errors_name_the_memory_needed():
    big = nn.Linear(2000, 100)  # 200,100 parameters: a float32 Hessian needs 149.2 GiB
    x = torch.randn(8, 2000)
    y = torch.randn(8, 100)
    with pytest.raises(ValueError, match=r"149\.2 GiB.*params="):
        loss_hessian(big, [(x, y)], F.mse_loss, use_gpu=False)
    with pytest.raises(ValueError, match=r"GiB"):
        output_hessian(big, x)
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"20\.3 KiB.*max_memory_bytes=1\.0 KiB"):
        loss_hessian(model, [classification_data(10, 4, 3)], F.cross_entropy, use_gpu=False, max_memory_bytes=1024)
    with pytest.raises(ValueError, match="max_memory_bytes"):
        dense_matrix(LambdaOperator(lambda v: v, 10**6))


def test_dense_matrix_of_operators_and_errors():
    a, _, _ = planted_matrix(list(np.linspace(-1, 2, 30)), seed=7)
    assert torch.allclose(dense_matrix(MatrixOperator(a), block_size=4, verbose=False), a, atol=0)
    model = tiny_mlp()
    x, y = classification_data(num=20, din=4, classes=3)
    with pytest.raises(ValueError, match="full_dataset=True"):
        dense_matrix(HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, full_dataset=False))


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_dense_eigenthings_on_planted_spectrum(which):
    spectrum = [-5.0, -1.0, 0.0, 0.5, 2.0, 3.0, 4.5] + list(np.linspace(-0.2, 0.2, 23))
    a, lam, _ = planted_matrix(spectrum, seed=8)
    result = dense_eigenthings(a, num_eigenthings=4, which=which)
    ref_vals, ref_vecs = exact_top(a, 4, which)
    assert np.allclose(result.eigenvalues, ref_vals, atol=1e-12)
    assert np.allclose(np.abs(np.sum(result.eigenvectors * ref_vecs, axis=1)), 1.0, atol=1e-10)
    assert result.eigenvectors.shape == (4, 30) and np.all(result.residuals < 1e-12) and result.converged.all()
    everything = dense_eigenthings(a.numpy(), which=which)
    assert everything.eigenvalues.shape == (30,)
    assert np.allclose(np.sort(everything.eigenvalues), np.sort(np.array(spectrum)), atol=1e-12)


def test_dense_eigenthings_of_a_model_hessian_agree_with_lanczos():
    model = tiny_mlp(4)
    x, y = classification_data(num=40, din=4, classes=3, seed=6)
    op = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False)
    dense = dense_eigenthings(op, num_eigenthings=3, which="LA", verbose=False)
    assert dense.num_products == 51
    iterative = lanczos(op, num_eigenthings=3, which="LA", tol=1e-10, verbose=False)
    assert np.allclose(dense.eigenvalues, iterative.eigenvalues, rtol=1e-8)
    with pytest.raises(ValueError, match="num_eigenthings"):
        dense_eigenthings(torch.eye(3), num_eigenthings=4)
    with pytest.raises(ValueError, match="square"):
        dense_eigenthings(torch.ones(3, 2))


def test_split_by_parameter_checks_sizes():
    with pytest.raises(ValueError, match="parameters hold"):
        split_by_parameter(torch.zeros(5, 5), ["a", "b"], [(2,), (2,)])
