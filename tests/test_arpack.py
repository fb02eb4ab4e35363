"""ARPACK Lanczos on planted spectra and on real model Hessians."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import hessian_eigenthings.solvers.arpack as arpack_module
from hessian_eigenthings import HVPOperator, LambdaOperator, NoConvergenceError, lanczos
from helpers import abs_cosines, exact_top, planted_matrix

SPECTRUM = [10.0, -8.0, 7.0, 5.5, -4.0, 3.9] + list(np.linspace(-2.0, 2.0, 294))


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_lanczos_matches_eigh(which):
    a, _, _ = planted_matrix(SPECTRUM, seed=1)
    vals, vecs = exact_top(a, 4, which)
    result = lanczos(a, 4, which=which, verbose=False)
    got_vals, got_vecs = result
    assert got_vals.shape == (4,) and got_vecs.shape == (4, 300)
    assert np.allclose(got_vals, vals, rtol=1e-6, atol=0)
    assert np.all(abs_cosines(got_vecs, vecs) >= 0.9999)
    assert np.allclose(np.linalg.norm(got_vecs, axis=1), 1.0, atol=1e-10)
    assert result.converged.all() and np.all(result.relative_residuals <= 1e-6)


def test_lanczos_on_model_hessian(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, nn.functional.cross_entropy, use_gpu=False)
    vals, vecs = exact_top(hessian, 6, "LA")
    result = lanczos(op, 6, which="LA", verbose=False)
    assert np.allclose(result.eigenvalues, vals, rtol=1e-6, atol=0)
    assert np.all(abs_cosines(result.eigenvectors, vecs) >= 0.9999)
    assert result.num_products == op.num_products


def test_init_vec_reaches_arpack(monkeypatch):
    a, _, q = planted_matrix(SPECTRUM, seed=2)
    seen = {}
    real_eigsh = arpack_module.eigsh

    def spy(*args, **kwargs):
        seen["v0"] = kwargs["v0"]
        return real_eigsh(*args, **kwargs)

    monkeypatch.setattr(arpack_module, "eigsh", spy)
    start = q[:, 0] + 0.1 * q[:, 5]
    lanczos(a, 2, init_vec=start, verbose=False)
    assert seen["v0"].dtype == np.float64
    assert np.array_equal(seen["v0"], start.numpy())


def test_no_convergence_raises_with_advice():
    a, _, _ = planted_matrix([1.0 + 1e-3 * i for i in range(200)], seed=3)
    with pytest.raises(NoConvergenceError, match="max_steps") as info:
        lanczos(a, 5, max_steps=1, num_lanczos_vectors=6, tol=1e-12, verbose=False)
    assert "num_lanczos_vectors" in str(info.value)


def test_float32_operator_runs_arpack_in_float64():
    a, _, _ = planted_matrix(SPECTRUM, seed=4, dtype=torch.float32)
    seen_dtypes = set()

    def product(v):
        seen_dtypes.add(v.dtype)
        return a @ v

    op = LambdaOperator(product, 300, dtype=torch.float32)
    scipy_op = op.to_scipy()
    assert scipy_op.dtype == np.float64
    result = lanczos(op, 3, verbose=False)
    assert seen_dtypes == {torch.float32}
    assert np.allclose(result.eigenvalues, [10.0, -8.0, 7.0], rtol=1e-5)


def test_bad_arguments():
    a, _, _ = planted_matrix(SPECTRUM, seed=5)
    with pytest.raises(ValueError, match="num_lanczos_vectors"):
        lanczos(a, 5, num_lanczos_vectors=5)
    with pytest.raises(ValueError, match="smaller than"):
        lanczos(a, 300)
    with pytest.raises(ValueError, match="which"):
        lanczos(a, 3, which="BE")
    with pytest.raises(TypeError, match="LambdaOperator"):
        lanczos(lambda v: v, 3)
    with pytest.raises(ValueError, match="symmetric"):
        lanczos(torch.triu(torch.ones(10, 10)), 2)
    for bad_tol in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tol must be a positive number"):
            lanczos(a, 3, tol=bad_tol)


@pytest.mark.parametrize("which", ["LM", "LA"])
def test_default_settings_converge_on_a_trained_float32_digits_mlp(which):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=512)
    op = HVPOperator(model, loader, nn.functional.cross_entropy, use_gpu=False)
    result = lanczos(op, 10, which=which, verbose=False)
    assert result.converged.all()
    top = lanczos(op, 1, which=which, verbose=False)
    assert top.converged.all()
    with pytest.raises(NoConvergenceError):  # the old default basis of 2k vectors, for k=1
        lanczos(op, 1, which=which, num_lanczos_vectors=2, max_steps=20, verbose=False)
    # float32 products resolve residuals to about eps * ||H||
    assert np.all(result.residuals <= 1e-6 * abs(result.eigenvalues[0]) + 1e-6 * np.abs(result.eigenvalues))
    # reference: the same network in float64, solved to tight tolerance
    model64 = copy.deepcopy(model).double()
    loader64 = [(xb.double(), yb) for xb, yb in loader]
    op64 = HVPOperator(model64, loader64, nn.functional.cross_entropy, use_gpu=False)
    exact = lanczos(op64, 10, which=which, tol=1e-10, verbose=False).eigenvalues
    assert np.allclose(result.eigenvalues, exact, rtol=1e-4)
