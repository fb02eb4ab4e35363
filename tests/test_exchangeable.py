"""XTrace and XDiag (spectrum/exchangeable.py) against exact references.

The fast m x m formulas are checked against a direct computation from the definitions (one QR per
leave-one-out basis); accuracy and error estimates against exact traces and diagonals of planted
spectra and of a small model's dense Hessian, over a fixed list of seeds (deterministic; the bands
are several binomial standard deviations wide).
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
    estimate_diagonal,
    estimate_trace,
    hessian_trace,
    hutchinson_diagonal,
    hutchpp_trace,
    xdiag,
    xtrace,
    xtrace_frobenius,
)
from hessian_eigenthings.spectrum import exchangeable
from hessian_eigenthings.spectrum.exchangeable import ExchangeableSketch, diagonal_statistics
from hessian_eigenthings.spectrum.probes import check_probe_arguments
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


def hessian_like(n=200, seed=1):
    """A few large outliers over a small, slightly indefinite bulk, like a loss Hessian's spectrum."""
    bulk = np.abs(np.random.default_rng(seed).standard_normal(n - 4)) ** 3 * 0.05 - 0.01
    return planted_matrix([30.0, 12.0, 8.0, 5.0] + list(bulk), seed=seed)


class NoBar:
    def update(self, count):
        pass


def direct_replicate(a, omega, keep, i, kind, rescale):
    """One exchangeable replicate from its definition: basis of A applied to the test vectors ``keep``,
    residual probe ``omega[:, i]`` (rescaled onto the sphere of the complement if ``rescale``)."""
    n = a.shape[0]
    q, _ = np.linalg.qr(a @ omega[:, keep])
    x = omega[:, i] - q @ (q.T @ omega[:, i])
    scale = (n - len(keep)) / (x @ x) if rescale else 1.0
    if kind == "trace":
        return np.trace(q.T @ a @ q) + scale * x @ a @ x
    if kind == "frobenius":
        return np.sum((a @ q) ** 2) + scale * np.sum((a @ x) ** 2)
    p = q @ q.T
    return np.diag(p @ a) + omega[:, i] * ((np.eye(n) - p) @ a @ omega[:, i])


@pytest.mark.parametrize("distribution", ["sphere", "rademacher"])
def test_fast_formulas_match_the_direct_leave_one_out_and_leave_two_out_replicates(distribution, monkeypatch):
    a_t, _, _ = planted_matrix([5.0, 3.0, 2.0] + list(np.linspace(-1.0, 1.0, 37)), seed=2)
    a, n, m = a_t.numpy(), 40, 7
    sketch = ExchangeableSketch(MatrixOperator(a_t), check_probe_arguments(100, None, None, 2, 3, distribution, 3),
                                NoBar())
    sketch.grow(4)  # two rounds: the incremental QR must give the same replicates as one
    sketch.grow(3)
    omega = sketch.omega.numpy()
    rescale = distribution != "rademacher"
    algebra = sketch.algebra()
    others = lambda *out: [k for k in range(m) if k not in out]  # noqa: E731
    for kind in ("trace", "frobenius"):
        if kind == "trace":
            values, deltas = algebra.trace(distribution, sketch.gram(sketch.products, sketch.omega))
        else:
            values, deltas = algebra.frobenius(distribution, sketch.gram(sketch.products, sketch.products))
        direct = np.array([direct_replicate(a, omega, others(i), i, kind, rescale) for i in range(m)])
        np.testing.assert_allclose(values.numpy(), direct, rtol=1e-12, atol=1e-12)
        for i in range(m):
            for j in range(m):
                change = 0.0 if i == j else direct[i] - direct_replicate(a, omega, others(i, j), i, kind, rescale)
                assert float(deltas[i, j]) == pytest.approx(change, rel=1e-10, abs=1e-11)
    # XDiag: per-entry mean, standard error with the covariance over the pairs used, paper's error
    replicates = np.stack([direct_replicate(a, omega, others(i), i, "diag", rescale) for i in range(m)], axis=1)
    changes = {
        (i, j): replicates[:, i] - direct_replicate(a, omega, others(i, j), i, "diag", rescale)
        for i in range(m) for j in range(m) if i != j
    }
    for offsets, pairs in ((8, [(i, j) for i in range(m) for j in range(m) if i < j]),
                           (2, [(i, (i + k) % m) for i in range(m) for k in (1, 2)])):
        monkeypatch.setattr(exchangeable, "DIAGONAL_PAIR_OFFSETS", offsets)
        covariance = np.mean([changes[i, j] * changes[j, i] for i, j in pairs], axis=0)
        variance = replicates.var(axis=1, ddof=1) / m + np.maximum(covariance, 0)
        mean, se, paper = diagonal_statistics(sketch, algebra)
        np.testing.assert_allclose(mean.numpy(), replicates.mean(axis=1), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(se.numpy(), np.sqrt(variance), rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(paper.numpy(), replicates.std(axis=1, ddof=1) / math.sqrt(m), rtol=1e-9)


def test_a_full_sketch_is_exact():
    a, lam, _ = planted_matrix(list(np.linspace(-2.0, 3.0, 24)), seed=4)
    for distribution in ("sphere", "rademacher"):
        r = xtrace(a, max_products=100, distribution=distribution, verbose=False)
        assert r.estimate == pytest.approx(float(lam.sum()), abs=1e-12)
        assert r.std_error == 0.0 and r.num_products == 48 and r.num_probes == 24 and r.converged
    d = xdiag(a, max_products=100, verbose=False)
    torch.testing.assert_close(d.diagonal, a.diagonal(), rtol=0, atol=1e-13)
    assert torch.all(d.std_error == 0) and d.num_products == 48
    f = xtrace_frobenius(a, max_products=48, verbose=False)
    assert f.estimate == pytest.approx(float((lam**2).sum()), rel=1e-13) and f.std_error == 0.0


def test_sphere_and_gaussian_test_vectors_give_the_same_estimate():
    a, _, _ = hessian_like()
    sphere = xtrace(a, max_products=40, distribution="sphere", seed=5, verbose=False)
    gaussian = xtrace(a, max_products=40, distribution="gaussian", seed=5, verbose=False)
    np.testing.assert_allclose(sphere.samples, gaussian.samples, rtol=1e-10)
    assert sphere.std_error == pytest.approx(gaussian.std_error, rel=1e-8)


@pytest.mark.parametrize("spectrum", ["hessian_like", "indefinite"])
def test_xtrace_beats_hutchpp_and_its_error_estimate_is_calibrated(spectrum):
    if spectrum == "hessian_like":
        a, lam, _ = hessian_like()
    else:
        a, lam, _ = planted_matrix(list(np.linspace(-3.0, 1.0, 200)), seed=1)
    true = float(lam.sum())
    op = MatrixOperator(a)
    errors, reported, paper, covered, errors_pp = [], [], [], 0, []
    for seed in SEEDS:
        r = xtrace(op, max_products=40, seed=seed, verbose=False)
        assert r.num_products == 40 and r.num_probes == 20 and r.samples.shape == (20,)
        errors.append(r.estimate - true)
        reported.append(r.std_error)
        paper.append(r.info["paper_std_error"])
        covered += abs(r.estimate - true) <= 1.96 * r.std_error
        errors_pp.append(hutchpp_trace(op, max_products=40, seed=seed, verbose=False).estimate - true)
    rms, rms_pp = math.sqrt(np.mean(np.square(errors))), math.sqrt(np.mean(np.square(errors_pp)))
    # a few outliers: far better; a flat spectrum leaves no low-rank part to exploit, but it is no worse
    assert rms < (0.75 if spectrum == "hessian_like" else 1.0) * rms_pp
    assert abs(np.mean(errors)) < 4 * rms / math.sqrt(len(SEEDS))  # unbiased
    # the reported error is the true one on average, and its 95% intervals cover the truth ~95%
    # of the time; the paper's estimate (replicates taken as independent) is optimistic
    assert np.mean(reported) == pytest.approx(rms, rel=0.15)
    assert 0.90 <= covered / len(SEEDS) <= 0.985
    assert np.mean(paper) < np.mean(reported)


def test_xdiag_beats_hutchinson_on_a_hessian_like_spectrum_with_calibrated_errors():
    a, _, _ = hessian_like(n=120, seed=2)
    truth = a.diagonal()
    errors, reported = [], []
    hutchinson = []
    for seed in SEEDS[:100]:
        r = xdiag(a, max_products=40, seed=seed, verbose=False)
        assert r.method == "xdiag" and r.num_probes == 20 and r.num_products == 40
        errors.append(r.diagonal - truth)
        reported.append(r.std_error)
        hutchinson.append(hutchinson_diagonal(a, max_products=40, seed=seed, verbose=False).diagonal - truth)
    errors, reported, hutchinson = torch.stack(errors), torch.stack(reported), torch.stack(hutchinson)
    rms = errors.pow(2).mean(dim=0).sqrt()
    assert float(errors.pow(2).mean().sqrt()) < 0.3 * float(hutchinson.pow(2).mean().sqrt())
    assert float((reported.mean(dim=0) / rms).mean()) == pytest.approx(1.0, abs=0.15)
    coverage = float((errors.abs() <= 1.96 * reported).double().mean())
    assert 0.90 <= coverage <= 0.985


@pytest.mark.parametrize("estimator", [xtrace, xtrace_frobenius])
def test_relative_tolerance_stops_early_and_a_negative_operator_mirrors_a_positive_one(estimator):
    a, lam, _ = hessian_like(n=300)
    neg = estimator(-a, max_products=600, rtol=2e-3, block_size=8, seed=7, verbose=False)
    pos = estimator(a, max_products=600, rtol=2e-3, block_size=8, seed=7, verbose=False)
    assert pos.converged and neg.converged and 20 < pos.num_products < 600
    assert neg.num_products == pos.num_products and pos.num_products % 16 == 0  # rounds of 8 test vectors
    sign = -1 if estimator is xtrace else 1  # ||-A||_F = ||A||_F
    assert neg.estimate == pytest.approx(sign * pos.estimate, rel=1e-9)
    assert pos.std_error <= 2e-3 * abs(pos.estimate)
    true = float(lam.sum()) if estimator is xtrace else float((lam**2).sum())
    assert abs(pos.estimate - true) < 4 * pos.std_error


def test_tolerances_of_xdiag_and_the_warning_when_the_budget_runs_out():
    a, _, _ = hessian_like(n=150)
    r = xdiag(a, max_products=1000, tol=0.02, block_size=8, verbose=False)
    assert r.converged and float(r.std_error.max()) <= 0.02 and r.num_products < 1000
    with pytest.warns(ConvergenceWarning, match="xdiag: the budget of 40 products .* Raise max_products"):
        r = xdiag(a, max_products=40, rtol=1e-9, verbose=False)
    assert not r.converged
    with pytest.warns(ConvergenceWarning, match="xtrace: the budget of 40 products"):
        r = xtrace(a, max_products=41, tol=1e-9, verbose=False)  # an odd budget: 20 test vectors
    assert not r.converged and r.num_products == 40
    with pytest.warns(ConvergenceWarning):  # 4 test vectors: fewer than min_probes, never trusted
        r = xtrace(a, max_products=8, tol=1e9, min_probes=10, verbose=False)
    assert not r.converged and r.num_products == 8


def test_arguments_and_operators_that_are_refused():
    a, _, _ = hessian_like(n=50)
    with pytest.raises(ValueError, match="max_products >= 4"):
        xtrace(a, max_products=3, verbose=False)
    with pytest.raises(ValueError, match="hutchinson_trace"):
        xtrace(mini_batch_like(a, 0.5, 0), verbose=False)
    with pytest.raises(ValueError, match="hutchinson_diagonal"):
        xdiag(mini_batch_like(a, 0.5, 0), verbose=False)
    with pytest.raises(ValueError, match="method"):
        estimate_diagonal(a, "xdiag++")


def test_reproducible_private_randomness_independent_of_block_size():
    a, _, _ = hessian_like(n=80)
    state = torch.get_rng_state()
    first = xtrace(a, max_products=30, seed=3, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    again = xtrace(a, max_products=30, seed=3, block_size=4, verbose=False)
    np.testing.assert_allclose(first.samples, again.samples, rtol=1e-10)
    assert estimate_trace(a, "xtrace", max_products=30, seed=3, verbose=False).estimate == first.estimate
    d = estimate_diagonal(a, "xdiag", max_products=30, seed=3, verbose=False)
    torch.testing.assert_close(d.diagonal, xdiag(a, max_products=30, seed=3, block_size=5, verbose=False).diagonal,
                               rtol=1e-10, atol=1e-12)


def test_a_float32_operator_accumulates_in_float64():
    a, lam, _ = hessian_like(n=400, seed=3)
    a32 = a.float()
    op = LambdaOperator(lambda v: a32 @ v, 400, apply_block_fn=lambda m: a32 @ m)
    r = xtrace(op, max_products=60, seed=1, verbose=False)
    r64 = xtrace(a, max_products=60, seed=1, verbose=False)
    assert abs(r.estimate - r64.estimate) < 1e-4 * abs(r64.estimate) + 0.05 * r64.std_error
    d = xdiag(op, max_products=60, seed=1, verbose=False)
    assert d.diagonal.dtype == torch.float32
    torch.testing.assert_close(d.diagonal.double(), xdiag(a, max_products=60, seed=1, verbose=False).diagonal,
                               rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    x, y = classification_data(num=120, din=6, classes=4, seed=5)
    return model, batches(x, y, [50, 50, 20]), dense_loss_hessian(model, F.cross_entropy, x, y)


def test_model_hessian_trace_and_diagonal(tiny_problem):
    model, loader, hessian = tiny_problem
    before = model_snapshot(model)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    r = xtrace(op, max_products=60, verbose=False)
    assert abs(r.estimate - float(hessian.trace())) < 4 * r.std_error
    pp = hutchpp_trace(op, max_products=60, verbose=False)
    assert abs(r.estimate - float(hessian.trace())) < abs(pp.estimate - float(hessian.trace())) + 2 * r.std_error
    d = xdiag(op, max_products=60, verbose=False)
    err = (d.diagonal - hessian.diagonal()).abs()
    assert float((err <= 3 * d.std_error + 1e-12).double().mean()) >= 0.95
    one_call = hessian_trace(model, loader, F.cross_entropy, method="xtrace", max_products=60, use_gpu=False,
                             verbose=False)
    assert one_call.method == "xtrace" and one_call.estimate == pytest.approx(r.estimate, rel=1e-9)
    assert_model_unchanged(model, before)


@pytest.mark.gpu
def test_on_the_gpu_everything_stays_on_the_device():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a, lam, _ = hessian_like(n=300)
    op = MatrixOperator(a.cuda())
    r = xtrace(op, max_products=60, seed=2, verbose=False)
    cpu = xtrace(a, max_products=60, seed=2, verbose=False)
    assert r.estimate == pytest.approx(cpu.estimate, rel=1e-9) and r.std_error == pytest.approx(cpu.std_error, rel=1e-6)
    d = xdiag(op, max_products=60, seed=2, verbose=False)
    assert d.diagonal.device.type == "cuda"
    torch.testing.assert_close(d.diagonal.cpu(), xdiag(a, max_products=60, seed=2, verbose=False).diagonal,
                               rtol=1e-9, atol=1e-10)
    f = xtrace_frobenius(op, max_products=60, seed=2, verbose=False)
    assert f.estimate == pytest.approx(xtrace_frobenius(a, max_products=60, seed=2, verbose=False).estimate, rel=1e-9)
