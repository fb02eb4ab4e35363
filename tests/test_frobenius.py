"""Squared Frobenius norm estimators (spectrum/frobenius.py) against exact values: planted spectra
(sum of squared eigenvalues), the closed-form variance of Hutchinson's estimator, and a small
model's dense Hessian; error estimates checked for coverage over a fixed list of seeds."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    ConvergenceWarning,
    FrobeniusEstimate,
    HVPOperator,
    estimate_frobenius,
    hutchinson_frobenius,
    hutchpp_frobenius,
    xtrace_frobenius,
)
from helpers import batches, classification_data, dense_loss_hessian, mini_batch_like, planted_matrix

F = nn.functional
SEEDS = list(range(200))


def outliers_over_bulk(n=150, seed=1):
    bulk = np.random.default_rng(seed).uniform(-1.0, 1.0, n - 5)
    return planted_matrix([40.0, 25.0, 15.0, 8.0, 4.0] + list(bulk), seed=seed)


def test_hutchinson_variance_is_the_closed_form_and_intervals_cover():
    a, lam, _ = planted_matrix(list(np.linspace(-2.0, 2.0, 60)), seed=2)
    true = float((lam**2).sum())
    b = a @ a
    variance = float(2 * ((b**2).sum() - (b.diagonal() ** 2).sum()))  # Rademacher z^T B z, B = A^2
    errors, covered = [], 0
    for seed in SEEDS:
        r = hutchinson_frobenius(a, max_products=50, seed=seed, verbose=False)
        assert isinstance(r, FrobeniusEstimate) and r.num_products == 50 and r.samples.shape == (50,)
        errors.append(r.estimate - true)
        covered += abs(r.estimate - true) <= 1.96 * r.std_error
    assert math.sqrt(np.mean(np.square(errors))) == pytest.approx(math.sqrt(variance / 50), rel=0.15)
    assert abs(np.mean(errors)) < 4 * math.sqrt(variance / 50 / len(SEEDS))
    assert 0.90 <= covered / len(SEEDS) <= 0.99


def test_deflated_variants_beat_hutchinson_on_outliers_and_report_honest_errors():
    a, lam, _ = outliers_over_bulk()
    true = float((lam**2).sum())
    results = {}
    for name, estimator in (("hutchinson", hutchinson_frobenius), ("hutch++", hutchpp_frobenius),
                            ("xtrace", xtrace_frobenius)):
        errors, reported, covered = [], [], 0
        for seed in SEEDS[:100]:
            r = estimator(a, max_products=60, seed=seed, verbose=False)
            assert r.num_products == 60 and r.method == name
            errors.append(r.estimate - true)
            reported.append(r.std_error)
            covered += abs(r.estimate - true) <= 1.96 * r.std_error
        rms = math.sqrt(np.mean(np.square(errors)))
        results[name] = rms
        assert np.mean(reported) == pytest.approx(rms, rel=0.25), name
        assert 0.88 <= covered / 100 <= 1.0, name
    # the five outliers hold 98% of sum(lambda^2): deflating them removes most of the variance
    assert results["hutch++"] < results["hutchinson"] / 20
    assert results["xtrace"] < results["hutch++"] * 0.8


def test_exact_with_a_full_sketch_and_on_a_model_hessian():
    a, lam, _ = planted_matrix(list(np.linspace(-1.0, 3.0, 20)), seed=3)
    r = hutchpp_frobenius(a, max_products=60, sketch_size=20, verbose=False)
    assert r.estimate == pytest.approx(float((lam**2).sum()), rel=1e-12) and r.std_error == 0.0
    assert r.num_products == 40 and r.num_probes == 0

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = classification_data(num=90, din=5, classes=3, seed=1)
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
    true = float((hessian**2).sum())
    op = HVPOperator(model, batches(x, y, [45, 45]), F.cross_entropy, use_gpu=False)
    for method in ("hutchinson", "hutch++", "xtrace"):
        est = estimate_frobenius(op, method, max_products=40, verbose=False)
        assert abs(est.estimate - true) < 4 * est.std_error + 1e-9 * true, method
        assert est.norm == pytest.approx(math.sqrt(est.estimate))
        assert est.norm_std_error == pytest.approx(est.std_error / (2 * est.norm))


def test_adaptive_stopping_budget_warning_and_refusals():
    a, lam, _ = outliers_over_bulk()
    r = hutchpp_frobenius(a, max_products=2000, rtol=1e-3, verbose=False)
    assert r.converged and r.std_error <= 1e-3 * r.estimate and r.num_products < 2000
    assert abs(r.estimate - float((lam**2).sum())) < 4 * r.std_error
    with pytest.warns(ConvergenceWarning, match="hutchinson_frobenius: the budget of 30 products"):
        assert not hutchinson_frobenius(a, max_products=30, tol=1e-6, verbose=False).converged
    for estimator in (hutchinson_frobenius, hutchpp_frobenius, xtrace_frobenius):
        with pytest.raises(ValueError, match="biased"):
            estimator(mini_batch_like(a, 0.5, 0), verbose=False)
    with pytest.raises(ValueError, match="method"):
        estimate_frobenius(a, "lanczos")
