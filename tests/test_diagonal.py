"""Diagonal estimators against exact diagonals: planted matrices and dense model Hessians."""


import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    ConvergenceWarning,
    GGNOperator,
    HVPOperator,
    MatrixOperator,
    exact_diagonal,
    hessian_diagonal,
    hutchinson_diagonal,
)
from helpers import (
    assert_model_unchanged,
    batches,
    classification_data,
    dense_loss_hessian,
    mini_batch_like,
    model_snapshot,
    planted_matrix,
)

F = nn.functional
SEEDS = list(range(100))


@pytest.fixture(scope="module")
def matrix():
    a, _, _ = planted_matrix(list(np.linspace(-2.0, 4.0, 60)), seed=5)
    return a


def test_exact_diagonal_of_planted_matrix(matrix):
    result = exact_diagonal(MatrixOperator(matrix), block_size=7, verbose=False)
    assert torch.allclose(result.diagonal, matrix.diagonal(), rtol=0, atol=1e-14)
    assert result.method == "exact" and result.num_products == 60 and torch.all(result.std_error == 0)
    assert result.trace() == pytest.approx(float(matrix.trace()), abs=1e-12)


def test_rademacher_is_exact_on_a_diagonal_matrix():
    d = torch.linspace(-3.0, 3.0, 40, dtype=torch.float64)
    result = hutchinson_diagonal(torch.diag(d), max_products=5, verbose=False)
    assert torch.allclose(result.diagonal, d, atol=1e-14)
    assert float(result.std_error.max()) < 1e-14


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_error_rate_variance_and_coverage(matrix, distribution):
    truth = matrix.diagonal()
    sq = matrix**2
    # variance of entry i of one sample z_i (A z)_i
    if distribution == "rademacher":
        var = sq.sum(dim=1) - truth**2
    else:
        var = sq.sum(dim=1) + truth**2
    rms = {}
    for k in (16, 256):
        errs, covered = [], 0
        for seed in SEEDS:
            r = hutchinson_diagonal(matrix, max_products=k, distribution=distribution, seed=seed, verbose=False)
            err = r.diagonal - truth
            errs.append(err)
            covered += int((err.abs() <= 1.96 * r.std_error).sum())
        errs = torch.stack(errs)
        # per-entry RMS error over seeds matches sqrt(variance / k)
        per_entry = errs.pow(2).mean(dim=0).sqrt()
        ratio = per_entry / (var / k).sqrt()
        assert float(ratio.mean()) == pytest.approx(1.0, abs=0.06)
        rms[k] = float(errs.pow(2).mean().sqrt())
        coverage = covered / (len(SEEDS) * matrix.shape[0])
        # 95% intervals: with only 16 probes the normal interval under-covers a little (Student's t
        # with 15 degrees of freedom gives 93%, and Gaussian probes have heavy-tailed samples)
        assert (0.86 if k == 16 else 0.93) <= coverage <= 0.975
    assert rms[16] / rms[256] == pytest.approx(4.0, rel=0.1)  # 1/sqrt(k)


def test_tolerances_stop_and_budget_warns(matrix):
    r = hutchinson_diagonal(matrix, max_products=10_000, tol=0.2, block_size=8, verbose=False)
    assert r.converged and float(r.std_error.max()) <= 0.2 and r.num_products < 10_000
    r = hutchinson_diagonal(matrix, max_products=10_000, rtol=0.1, verbose=False)
    assert r.converged
    assert float(r.std_error.norm()) <= 0.1 * float(r.diagonal.norm())
    with pytest.warns(ConvergenceWarning, match="max_products"):
        r = hutchinson_diagonal(matrix, max_products=20, tol=1e-8, verbose=False)
    assert not r.converged and r.num_products == 20
    with pytest.raises(ValueError, match="tol"):
        hutchinson_diagonal(matrix, tol=0)
    with pytest.raises(ValueError, match="block_size"):
        exact_diagonal(matrix, block_size=0)


def test_global_rng_untouched(matrix):
    state = torch.get_rng_state()
    hutchinson_diagonal(matrix, max_products=10, seed=None, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.fixture(scope="module")
def tiny_problem():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = classification_data(num=70, din=4, classes=3, seed=2)
    return model, x, y, batches(x, y, [32, 32, 6]), dense_loss_hessian(model, F.cross_entropy, x, y)


def test_exact_model_hessian_diagonal_by_parameter(tiny_problem):
    model, _, _, loader, hessian = tiny_problem
    model.train()
    before = model_snapshot(model)
    result = hessian_diagonal(model, loader, F.cross_entropy, exact=True, use_gpu=False, verbose=False)
    assert_model_unchanged(model, before)
    assert torch.allclose(result.diagonal, hessian.diagonal(), rtol=1e-10, atol=1e-13)
    parts = result.info["by_parameter"]
    assert list(parts) == [n for n, _ in model.named_parameters()]
    assert parts["2.weight"].shape == (3, 7)
    offset = 4 * 7 + 7
    assert torch.equal(parts["2.weight"].reshape(-1), result.diagonal[offset : offset + 21])


def test_stochastic_model_diagonal_covers_the_truth(tiny_problem):
    model, _, _, loader, hessian = tiny_problem
    result = hessian_diagonal(model, loader, F.cross_entropy, max_products=64, use_gpu=False, seed=3, verbose=False)
    err = (result.diagonal - hessian.diagonal()).abs()
    # 59 entries: nearly all within 3 standard errors
    assert float((err <= 3 * result.std_error + 1e-12).double().mean()) >= 0.95
    assert result.num_products == 64


def test_block_diagonal_of_a_layer_and_of_the_ggn(tiny_problem):
    model, x, y, loader, hessian = tiny_problem
    block = exact_diagonal(HVPOperator(model, loader, F.cross_entropy, use_gpu=False, params=["2"]), verbose=False)
    assert torch.allclose(block.diagonal, hessian.diagonal()[35:], rtol=1e-10, atol=1e-13)
    # for the last layer of a cross-entropy model the GGN and the Hessian coincide on its block
    ggn = exact_diagonal(GGNOperator(model, loader, F.cross_entropy, use_gpu=False, params=["2"]), verbose=False)
    assert torch.allclose(ggn.diagonal, block.diagonal, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="full_dataset"):
        hessian_diagonal(model, loader, F.cross_entropy, exact=True, full_dataset=False, use_gpu=False)
    with pytest.raises(ValueError, match="full_dataset=True"):
        exact_diagonal(HVPOperator(model, loader, F.cross_entropy, use_gpu=False, full_dataset=False))


def test_standard_errors_on_a_stochastic_operator_include_the_mini_batch_noise(matrix):
    """The mini-batch shift c I moves every diagonal entry of a block together: per-entry errors must
    come from the spread between blocks, not from the 16 probes of one block."""
    truth = matrix.diagonal()
    errs, ses = [], []
    for seed in SEEDS:
        r = hutchinson_diagonal(mini_batch_like(matrix, 0.5, 2000 + seed), max_products=320, block_size=16,
                                seed=seed, verbose=False)
        assert r.info["clustered"]
        errs.append(r.diagonal - truth)
        ses.append(r.std_error)
    errs, ses = torch.stack(errs), torch.stack(ses)
    rms = errs.pow(2).mean(dim=0).sqrt()
    assert float((ses.mean(dim=0) / rms).mean()) == pytest.approx(1.0, abs=0.1)
    coverage = float((errs.abs() <= 1.96 * ses).double().mean())
    assert 0.89 <= coverage <= 0.98  # 20 blocks: Student's t with 19 df covers 93.6%
    # blocks of one probe: the clustered errors are the ordinary ones
    one = hutchinson_diagonal(mini_batch_like(matrix, 0.0, 0), max_products=30, block_size=1, seed=4, verbose=False)
    plain = hutchinson_diagonal(matrix, max_products=30, block_size=1, seed=4, verbose=False)
    assert torch.allclose(one.diagonal, plain.diagonal, rtol=1e-12, atol=1e-14)
    assert torch.allclose(one.std_error, plain.std_error, rtol=1e-9, atol=1e-14)
    single = hutchinson_diagonal(mini_batch_like(matrix, 0.5, 0), max_products=16, block_size=16, verbose=False)
    assert torch.all(torch.isinf(single.std_error))
