"""Trace estimators against exact traces: planted spectra, closed forms and a dense model Hessian.

The statistical checks run a fixed list of seeds, so they are deterministic; the bands are set
wide enough (several binomial standard deviations) that a correct estimator passes for any seed
list, and narrow enough that a wrong variance or a biased estimator fails.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    ConvergenceWarning,
    HVPOperator,
    LambdaOperator,
    MatrixOperator,
    hessian_trace,
    hutchinson_trace,
    hutchpp_trace,
)
from hessian_eigenthings.spectrum import estimate_trace
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
SEEDS = list(range(200))


@pytest.fixture(scope="module")
def indefinite():
    """A 100 x 100 symmetric matrix with eigenvalues from -3 to 1 (trace -100)."""
    a, lam, _ = planted_matrix(list(np.linspace(-3.0, 1.0, 100)), seed=3)
    return a, float(lam.sum())


def rademacher_variance(a: torch.Tensor) -> float:
    """Variance of one Rademacher sample z^T A z: 2 (||A||_F^2 - sum_i A_ii^2)."""
    return float(2 * ((a**2).sum() - (a.diagonal() ** 2).sum()))


def test_diagonal_matrix_is_exact_with_rademacher_probes():
    diag = torch.linspace(-2.0, 5.0, 50, dtype=torch.float64)
    result = hutchinson_trace(torch.diag(diag), max_products=12, verbose=False)
    assert result.estimate == pytest.approx(float(diag.sum()), abs=1e-12)
    assert result.std_error == pytest.approx(0.0, abs=1e-12)
    assert result.num_products == 12 and result.num_probes == 12 and result.samples.shape == (12,)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_error_rate_variance_and_coverage(indefinite, distribution):
    a, true = indefinite
    op = MatrixOperator(a)
    fro2 = float((a**2).sum())
    var = rademacher_variance(a) if distribution == "rademacher" else 2 * fro2
    rms, coverage = {}, {}
    for k in (25, 400):
        errors, covered = [], 0
        for seed in SEEDS:
            r = hutchinson_trace(op, max_products=k, distribution=distribution, seed=seed, verbose=False)
            errors.append(r.estimate - true)
            covered += abs(r.estimate - true) <= 1.96 * r.std_error
        rms[k] = math.sqrt(np.mean(np.square(errors)))
        coverage[k] = covered / len(SEEDS)
        # the error is that of the theory, sqrt(variance / k), within sampling error of 200 runs
        assert rms[k] == pytest.approx(math.sqrt(var / k), rel=0.15)
        # unbiased: the mean error is within 4 standard errors of zero
        assert abs(np.mean(errors)) < 4 * math.sqrt(var / k / len(SEEDS))
    # 16 times the probes: 4 times smaller error (1/sqrt(k))
    assert rms[25] / rms[400] == pytest.approx(4.0, rel=0.2)
    # the reported standard error is honest: 95% intervals cover the truth ~95% of the time
    # (binomial sd over 200 seeds is 1.5%; small-sample t effects lower it slightly at k=25)
    assert 0.89 <= coverage[25] <= 0.99
    assert 0.91 <= coverage[400] <= 0.99


def test_hutchpp_beats_hutchinson_and_converges_faster_on_decaying_spectrum():
    # Hessian-like: a few large eigenvalues, a long decaying tail
    a, lam, _ = planted_matrix(list(1.0 / np.arange(1, 301) ** 2), seed=4)
    true = float(lam.sum())
    op = MatrixOperator(a)
    rms_pp, rms_h, coverage = {}, {}, {}
    for m in (30, 120):
        e_pp, e_h, covered = [], [], 0
        for seed in SEEDS[:100]:
            r = hutchpp_trace(op, max_products=m, seed=seed, verbose=False)
            assert r.num_products == m and r.info["sketch_size"] == m // 3
            e_pp.append(r.estimate - true)
            covered += abs(r.estimate - true) <= 1.96 * r.std_error
            e_h.append(hutchinson_trace(op, max_products=m, seed=seed, verbose=False).estimate - true)
        rms_pp[m], rms_h[m] = math.sqrt(np.mean(np.square(e_pp))), math.sqrt(np.mean(np.square(e_h)))
        coverage[m] = covered / 100
    assert rms_h[30] / rms_h[120] == pytest.approx(2.0, rel=0.25)  # Hutchinson: 1/sqrt(m)
    assert rms_pp[30] / rms_pp[120] > 4.0  # Hutch++: at least 1/m on this spectrum
    assert rms_pp[120] < rms_h[120] / 20
    # the standard error of the residual phase covers the truth (10 probes at m=30, 40 at m=120)
    assert 0.80 <= coverage[30] <= 1.0
    assert 0.89 <= coverage[120] <= 1.0


def test_hutchpp_coverage_on_indefinite_operator(indefinite):
    a, true = indefinite
    covered, errors = 0, []
    for seed in SEEDS:
        r = hutchpp_trace(a, max_products=150, seed=seed, verbose=False)
        errors.append(r.estimate - true)
        covered += abs(r.estimate - true) <= 1.96 * r.std_error
    assert 0.91 <= covered / len(SEEDS) <= 0.99
    assert abs(np.mean(errors)) < 4 * np.std(errors) / math.sqrt(len(SEEDS))


def test_hutchpp_with_full_sketch_is_exact(indefinite):
    a, true = indefinite
    r = hutchpp_trace(a, max_products=400, sketch_size=100, verbose=False)
    assert r.estimate == pytest.approx(true, abs=1e-10)
    assert r.std_error == 0.0 and r.num_products == 200 and r.num_probes == 0


@pytest.mark.parametrize("method", [hutchinson_trace, hutchpp_trace])
def test_adaptive_stopping_on_negative_trace_is_mirror_of_positive(indefinite, method):
    """A negative trace must stop exactly when its mirror image with a positive trace stops."""
    a, true = indefinite
    neg = method(a, max_products=3000, rtol=0.01, seed=7, verbose=False)
    pos = method(-a, max_products=3000, rtol=0.01, seed=7, verbose=False)
    assert neg.converged and pos.converged
    assert neg.num_products == pos.num_products
    assert neg.estimate == pytest.approx(-pos.estimate, rel=1e-12)
    assert neg.std_error <= 0.01 * abs(neg.estimate)
    # it really had to work for it: far more than the minimum of 10 probes
    assert neg.num_probes > 50
    assert abs(neg.estimate - true) < 4 * neg.std_error


def test_absolute_tolerance_stops_early_and_is_accurate_over_seeds(indefinite):
    a, true = indefinite
    var = rademacher_variance(a)
    tol = 1.0
    expected_probes = var / tol**2
    within, used = 0, []
    for seed in SEEDS[:100]:
        r = hutchinson_trace(a, max_products=5000, tol=tol, block_size=8, seed=seed, verbose=False)
        assert r.converged and r.std_error <= tol
        used.append(r.num_products)
        within += abs(r.estimate - true) <= 1.96 * tol
    assert 0.7 * expected_probes < np.mean(used) < 1.3 * expected_probes
    assert within >= 88  # sequential stopping costs a little coverage, not much


def test_budget_runs_out_with_warning(indefinite):
    a, _ = indefinite
    with pytest.warns(ConvergenceWarning, match="max_products"):
        r = hutchinson_trace(a, max_products=30, tol=1e-6, verbose=False)
    assert not r.converged and r.num_products == 30
    with pytest.warns(ConvergenceWarning):
        r = hutchpp_trace(a, max_products=30, tol=1e-6, verbose=False)
    assert not r.converged and r.num_products == 30


def test_private_generator_and_reproducibility(indefinite):
    a, _ = indefinite
    state = torch.get_rng_state()
    first = hutchinson_trace(a, max_products=40, seed=11, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    again = hutchinson_trace(a, max_products=40, seed=11, block_size=5, verbose=False)
    assert np.allclose(first.samples, again.samples, rtol=1e-12, atol=1e-12)  # same probes in any block size
    other = hutchinson_trace(a, max_products=40, seed=12, verbose=False)
    assert not np.allclose(first.samples, other.samples)
    assert estimate_trace(a, "hutchinson", max_products=40, seed=11, verbose=False).estimate == first.estimate


def test_bad_arguments_are_named(indefinite):
    a, _ = indefinite
    with pytest.raises(ValueError, match="tol"):
        hutchinson_trace(a, tol=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        hutchinson_trace(a, rtol=float("nan"))
    with pytest.raises(ValueError, match="max_products"):
        hutchinson_trace(a, max_products=0)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(a, distribution="uniform")
    with pytest.raises(ValueError, match="max_products"):
        hutchpp_trace(a, max_products=20, sketch_size=10)
    with pytest.raises(ValueError, match="method"):
        estimate_trace(a, "xtrace++")
    with pytest.raises(TypeError, match="LambdaOperator"):
        hutchinson_trace(lambda v: v)


def test_works_on_a_float32_lambda_operator():
    diag = torch.linspace(-1.0, 3.0, 500)
    op = LambdaOperator(lambda v: diag * v, 500, apply_block_fn=lambda m: diag[:, None] * m)
    r = hutchpp_trace(op, max_products=60, distribution="gaussian", verbose=False)
    assert abs(r.estimate - float(diag.double().sum())) < 4 * r.std_error + 1e-3


@pytest.fixture(scope="module")
def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = classification_data(num=90, din=5, classes=3, seed=1)
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
    return model, batches(x, y, [40, 40, 10]), hessian


def test_model_hessian_trace_one_call(tiny_problem):
    model, loader, hessian = tiny_problem
    true = float(hessian.trace())
    before = model_snapshot(model)
    r = hessian_trace(model, loader, F.cross_entropy, max_products=60, use_gpu=False, verbose=False)
    assert_model_unchanged(model, before)
    assert r.method == "hutch++" and r.num_products == 60
    assert abs(r.estimate - true) < 4 * r.std_error + 1e-9 * abs(true)
    # the helper is a thin wrapper: identical to the estimator on the operator
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=25)
    same = hutchpp_trace(op, max_products=60, verbose=False)
    assert same.estimate == pytest.approx(r.estimate, rel=1e-10)
    # the GGN of the same model through the same helper (its trace differs from the Hessian's)
    ggn = hessian_trace(model, loader, F.cross_entropy, curvature="ggn", method="hutchinson", use_gpu=False,
                        max_products=30, verbose=False)
    assert ggn.method == "hutchinson" and ggn.estimate > 0
    with pytest.raises(TypeError, match="unknown keyword"):
        hessian_trace(model, loader, F.cross_entropy, use_gpu=False, power_iter_steps=3)
    with pytest.raises(ValueError, match="curvature"):
        hessian_trace(model, loader, F.cross_entropy, use_gpu=False, curvature="newton")


def test_standard_error_on_a_stochastic_operator_includes_the_mini_batch_noise():
    """On a mini-batch operator the 16 probes of a block share one mini-batch: the standard error must
    come from the spread between blocks. (Treating the probes as independent reported 1.5 against a
    true error of 5.7 here, and covered the truth 36% of the time.)"""
    a, lam, _ = planted_matrix(list(np.linspace(-1.0, 3.0, 50)), seed=1)
    true = float(lam.sum())
    errors, reported, covered = [], [], 0
    for seed in SEEDS:
        r = hutchinson_trace(mini_batch_like(a, 0.5, 1000 + seed), max_products=320, block_size=16, seed=seed,
                             verbose=False)
        errors.append(r.estimate - true)
        reported.append(r.std_error)
        covered += abs(r.estimate - true) <= 1.96 * r.std_error
        assert r.info["clustered"]
    rms = math.sqrt(np.mean(np.square(errors)))
    assert np.mean(reported) == pytest.approx(rms, rel=0.15)
    assert 0.89 <= covered / len(SEEDS) <= 0.99  # 20 blocks: Student's t with 19 df covers 93.6%
    # blocks of one probe: the clustered error is the ordinary one
    one = hutchinson_trace(mini_batch_like(a, 0.0, 0), max_products=40, block_size=1, seed=3, verbose=False)
    plain = hutchinson_trace(a, max_products=40, block_size=1, seed=3, verbose=False)
    assert one.estimate == pytest.approx(plain.estimate, rel=1e-12)
    assert one.std_error == pytest.approx(plain.std_error, rel=1e-10)
    # a single block cannot measure the mini-batch noise
    assert hutchinson_trace(mini_batch_like(a, 0.5, 0), max_products=16, block_size=16, verbose=False).std_error == math.inf
    with pytest.raises(ValueError, match="hutchinson_trace"):
        hutchpp_trace(mini_batch_like(a, 0.5, 0), verbose=False)


def test_one_call_trace_on_mini_batches_uses_hutchinson(tiny_problem):
    model, loader, hessian = tiny_problem
    r = hessian_trace(model, loader, F.cross_entropy, full_dataset=False, max_products=96, use_gpu=False,
                      verbose=False)
    assert r.method == "hutchinson" and r.info["clustered"] and r.num_products == 96
    # six blocks cycle twice through the three batches: the expectation is their unweighted mean
    expected = np.mean([float(dense_loss_hessian(model, F.cross_entropy, xb, yb).trace()) for xb, yb in loader])
    assert abs(r.estimate - expected) < 4 * r.std_error
    with pytest.raises(ValueError, match="deterministic"):
        hessian_trace(model, loader, F.cross_entropy, method="hutch++", full_dataset=False, use_gpu=False)
