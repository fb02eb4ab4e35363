"""Automatic momentum of power iteration (momentum=None) on planted spectra, against numpy.linalg.eigh."""

import inspect
import math
import warnings
from typing import Optional

import numpy as np
import pytest
import torch

from hessian_eigenthings import ConvergenceWarning, MatrixOperator, deflated_power_iteration, power_iteration
from hessian_eigenthings.solvers.momentum import AdaptiveMomentum, LastTwoIterates, momentum_bound, ritz_2x2
from hessian_eigenthings.solvers.power_iter import _iterate
from helpers import abs_cosines, exact_top, mini_batch_like, planted_matrix

# Product counts compare the power iterations alone, without a repeated-eigenvalue check after them
# where the solvers run one.
def _no_check(solver) -> dict:
    return {"check_multiplicity": False} if "check_multiplicity" in inspect.signature(solver).parameters else {}


NO_CHECK, NO_CHECK_SINGLE = _no_check(deflated_power_iteration), _no_check(power_iteration)

# No two eigenvalues of equal magnitude and opposite sign in these spectra, so "LM" is well posed.
SPECTRA = {
    # outliers over a bulk, like a trained network's Hessian
    "outliers": [10.0, 7.0, 5.0, 4.5, 4.0, 3.8] + list(np.linspace(-0.3, 0.9, 94)),
    # a tight cluster at the top: plain power iteration needs thousands of steps per pair
    "cluster": list(np.linspace(0.9, 1.0, 8)) + list(np.linspace(-0.5, 0.6, 92)),
    # a negative eigenvalue of nearly the largest magnitude
    "negative": [1.0, -0.98] + list(np.linspace(-0.5, 0.6, 98)),
}


def _matches_eigh(result, matrix, k, which, rtol):
    vals, vecs = exact_top(matrix, k, which)
    assert np.allclose(result.eigenvalues, vals, rtol=rtol, atol=0), (result.eigenvalues, vals)
    assert np.all(abs_cosines(result.eigenvectors, vecs) >= 1 - 10 * rtol)


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_automatic_momentum_matches_eigh_to_1e_8(name, which):
    a, _, _ = planted_matrix(SPECTRA[name], seed=3)
    for k in (1, 4):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            auto = deflated_power_iteration(a, k, power_iter_steps=5000, power_iter_err_threshold=1e-10,
                                            momentum=None, which=which, verbose=False, **NO_CHECK)
        _matches_eigh(auto, a, k, which, 1e-8)
        assert auto.converged.all() and np.all(auto.relative_residuals <= 1e-10)


@pytest.mark.parametrize(
    "name, which, k, least_ratio",
    # measured (plain / automatic products): 898 / 266, 60 / 31, 1393 / 159, 949 / 89
    [("outliers", "LM", 5, 2.5), ("outliers", "LA", 1, 1.5), ("cluster", "LA", 1, 5.0), ("negative", "LM", 1, 5.0)],
)
def test_fewer_products_than_plain_power_iteration(name, which, k, least_ratio):
    a, _, _ = planted_matrix(SPECTRA[name], seed=3)
    runs = {}
    for momentum in (0.0, None):
        runs[momentum] = deflated_power_iteration(a, k, power_iter_steps=5000, power_iter_err_threshold=1e-10,
                                                  momentum=momentum, which=which, verbose=False, **NO_CHECK)
        assert runs[momentum].converged.all()
    assert runs[0.0].num_products >= least_ratio * runs[None].num_products, (
        runs[0.0].num_products, runs[None].num_products)


def test_converges_where_plain_power_iteration_does_not_at_the_same_cap():
    # lambda_2 / lambda_1 = 0.999: plain power iteration needs about 2.3e4 steps for 1e-8 (5000 do
    # not converge); the automatic momentum converges in 234 products.
    a, _, q = planted_matrix([1.0, 0.999] + list(np.linspace(0.0, 0.9, 98)), seed=11)
    with pytest.warns(ConvergenceWarning):
        plain = power_iteration(a, steps=5000, error_threshold=1e-8, momentum=0.0, verbose=False, **NO_CHECK_SINGLE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        auto = power_iteration(a, steps=5000, error_threshold=1e-8, momentum=None, verbose=False, **NO_CHECK_SINGLE)
    assert plain.num_products == 5000 and not plain.converged.all()
    assert auto.converged.all() and auto.num_products <= 300, auto.num_products
    assert abs(auto.eigenvalues - 1.0) <= 1e-12
    assert abs(float(auto.eigenvectors @ q[:, 0])) >= 1 - 1e-10
    # the residual it reports is the one of the vector it returns
    v = auto.eigenvectors
    assert abs(float(torch.linalg.vector_norm(a @ v - auto.eigenvalues * v)) - auto.residuals[0]) <= 1e-14


@pytest.mark.parametrize(
    "spectrum, which, k",
    [
        ([10.0, 0.01] + list(np.linspace(0.001, 0.009, 98)), "LM", 1),  # huge gap: converges at once
        ([10.0, 0.01] + list(np.linspace(0.001, 0.009, 98)), "LA", 1),
        ([1.0, -0.999] + list(np.linspace(-0.5, 0.6, 98)), "LM", 2),  # +/- of nearly equal magnitude
        ([1.0, -0.999] + list(np.linspace(-0.5, 0.6, 98)), "SA", 1),  # shift by rho, B = rho I - A
        ([4.0, 2.0, 1.0, 0.5, 0.25, 0.125] + list(np.linspace(-0.05, 0.06, 94)), "LM", 5),  # deflation
        ([4.0, 2.0, 1.0, 0.5, 0.25, 0.125] + list(np.linspace(-0.05, 0.06, 94)), "LA", 5),
        ([-3.0, -2.0, -1.5, -1.2, -1.0, -0.5] + list(np.linspace(-0.3, 0.9, 94)), "SA", 5),
    ],
)
def test_never_slower_than_plain_where_momentum_cannot_help(spectrum, which, k):
    a, _, _ = planted_matrix(spectrum, seed=5)
    runs = {}
    for momentum in (0.0, None):
        runs[momentum] = deflated_power_iteration(a, k, power_iter_steps=5000, power_iter_err_threshold=1e-8,
                                                  momentum=momentum, which=which, verbose=False, **NO_CHECK)
    assert runs[None].converged.all() and runs[0.0].converged.all()
    assert runs[None].num_products <= runs[0.0].num_products, (runs[None].num_products, runs[0.0].num_products)
    _matches_eigh(runs[None], a, k, which, 1e-8)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_float32_operator(which):
    a, _, _ = planted_matrix(SPECTRA["outliers"], seed=7, dtype=torch.float32)
    op = MatrixOperator(a)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        auto = deflated_power_iteration(op, 3, power_iter_steps=3000, power_iter_err_threshold=1e-4,
                                        momentum=None, which=which, to_numpy=False, verbose=False, **NO_CHECK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # plain does not converge for SA in 1000 steps
        plain = deflated_power_iteration(op, 3, power_iter_steps=1000, power_iter_err_threshold=1e-4,
                                         momentum=0.0, which=which, verbose=False, **NO_CHECK)
    assert isinstance(auto.eigenvalues, torch.Tensor) and auto.converged.all()
    vals, vecs = exact_top(a, 3, which)
    # float32 products resolve eigenvalues to about eps * ||A|| = 1e-6 (||A|| = 10)
    assert np.allclose(auto.eigenvalues.cpu().numpy(), vals, rtol=0, atol=1e-5)
    assert np.all(abs_cosines(auto.eigenvectors.cpu().numpy(), vecs) >= 0.999)
    assert auto.num_products <= plain.num_products  # e.g. SA: 854 against 3000 (plain, not converged)


def _reference_iterate(
    op, x0, sign: float, shift: float, basis: Optional[torch.Tensor], steps: int, tol: float, momentum: float, scale
):
    """Power iteration with a fixed beta as it was before the automatic momentum (the oracle)."""

    def project(v):
        return v if basis is None else v - basis @ (basis.T @ v)

    x = project(x0)
    x = x / torch.linalg.vector_norm(x)
    x_prev = torch.zeros_like(x)
    floor_factor = 10 * torch.finfo(op.dtype).eps
    for step in range(steps):
        ax = project(op.apply(x))
        lam = torch.dot(x, ax)
        res = torch.linalg.vector_norm(ax - lam * x)
        lam_f, res_f, scale_f = float(lam), float(res), float(scale)
        if res_f <= max(tol * abs(lam_f), floor_factor * max(scale_f, abs(lam_f))):
            return lam, x, res, step + 1
        if step == steps - 1:
            break
        y = project(sign * ax + shift * x - momentum * x_prev)
        ynorm = torch.linalg.vector_norm(y)
        if float(ynorm) == 0:
            break
        x_prev = x / ynorm
        x = y / ynorm
    return lam, x, res, steps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.0, 0.2])
def test_explicit_momentum_gives_exactly_the_iterates_of_before(dtype, momentum):
    a, _, q = planted_matrix(SPECTRA["cluster"], seed=9, dtype=dtype)
    x0 = torch.randn(100, generator=torch.Generator().manual_seed(0), dtype=dtype)
    cases = [
        (1.0, 0.0, None, torch.zeros((), dtype=dtype)),  # LM
        (-1.0, 1.0, None, torch.tensor(1.0, dtype=dtype)),  # SA shift
        (1.0, 0.0, q[:, :2].contiguous(), torch.tensor(1.0, dtype=dtype)),  # deflated
    ]
    for sign, shift, basis, scale in cases:
        for steps in (7, 400):  # stopped by the cap, and by the tolerance
            op_new, op_old = MatrixOperator(a), MatrixOperator(a)
            lam, x, res = _iterate(op_new, x0, sign, shift, basis, steps, 1e-4, momentum, scale)
            lam0, x0_, res0, used = _reference_iterate(op_old, x0, sign, shift, basis, steps, 1e-4, momentum, scale)
            assert torch.equal(lam, lam0) and torch.equal(x, x0_) and torch.equal(res, res0)
            assert op_new.num_products == op_old.num_products == used


def test_stochastic_operator_gets_plain_steps():
    a, _, _ = planted_matrix(SPECTRA["outliers"], seed=2)
    auto = deflated_power_iteration(mini_batch_like(a, 0.01, seed=4), 2, power_iter_steps=60, momentum=None,
                                    verbose=False, **NO_CHECK)
    plain = deflated_power_iteration(mini_batch_like(a, 0.01, seed=4), 2, power_iter_steps=60, momentum=0.0,
                                     verbose=False, **NO_CHECK)
    assert np.array_equal(auto.eigenvalues, plain.eigenvalues)
    assert np.array_equal(auto.eigenvectors, plain.eigenvectors)
    assert auto.num_products == plain.num_products


def test_ritz_2x2_matches_eigh():
    gen = np.random.default_rng(0)
    cases = [(1.0, 0.0, 1.0), (2.0, 0.0, 1.0), (1.0, 0.0, 2.0), (1.0, 1e-12, 1.0)]
    cases += [tuple(gen.standard_normal(3)) for _ in range(50)]
    for h11, h12, h22 in cases:
        values, vectors = ritz_2x2(h11, h12, h22)
        matrix = np.array([[h11, h12], [h12, h22]])
        assert np.allclose(sorted(values), np.linalg.eigvalsh(matrix), atol=1e-14)
        for value, vector in zip(values, vectors):
            assert np.allclose(matrix @ np.array(vector), value * np.array(vector), atol=1e-13)
            assert math.isclose(np.hypot(*vector), 1.0, rel_tol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_momentum_never_exceeds_lambda_2_squared_over_4(dtype, which):
    # Interlacing: for any two vectors, even nearly parallel ones whose difference is at the rounding
    # level, the bound is at most lambda_2(B)^2 / 4 for B = sign A + shift I.
    spectrum = [3.0, 2.9, -2.95, 1.0] + list(np.linspace(-1.0, 1.0, 60))
    a, lam, q = planted_matrix(spectrum, seed=1, dtype=dtype)
    rho = float(lam.abs().max())
    sign, shift = {"LM": (1.0, 0.0), "LA": (1.0, rho), "SA": (-1.0, rho)}[which]
    b = np.sort(np.abs(sign * lam.double().numpy() + shift))[::-1]
    safe = b[1] ** 2 / 4
    gen = torch.Generator().manual_seed(0)
    largest = 0.0
    for trial in range(200):
        # vectors near the top eigenvectors, where the estimate is largest
        base = q[:, :3] @ torch.randn(3, generator=gen, dtype=dtype) + 0.01 * torch.randn(64, generator=gen, dtype=dtype)
        base = base / torch.linalg.vector_norm(base)
        if trial % 2:  # nearly parallel to base, down to a difference at the rounding level
            other = base + 10.0 ** (-(trial % 16) // 2) * torch.randn(64, generator=gen, dtype=dtype)
        else:  # another vector near the top eigenvectors: the estimate comes close to the bound
            other = q[:, :3] @ torch.randn(3, generator=gen, dtype=dtype) + 0.01 * torch.randn(64, generator=gen, dtype=dtype)
        other = other / torch.linalg.vector_norm(other)
        window = LastTwoIterates()
        window.remember(base, a @ base)
        estimator = AdaptiveMomentum(sign, shift, dtype)
        ax = a @ other
        lam_x = torch.dot(other, ax)
        step = window.step(other, ax, ax - lam_x * other)
        beta = estimator.update(step.scalars.tolist(), float(lam_x), rho)
        assert beta <= safe * (1 + 1e-12), (trial, beta, safe)
        largest = max(largest, beta)
    assert largest >= 0.5 * safe  # the bound is not vacuous


def test_estimate_rises_to_lambda_2_squared_over_4_during_a_solve():
    spectrum = [1.0, 0.95] + list(np.linspace(-0.5, 0.8, 98))
    a, _, _ = planted_matrix(spectrum, seed=4)
    x = torch.randn(100, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x / torch.linalg.vector_norm(x)
    window, estimator = LastTwoIterates(), AdaptiveMomentum(1.0, 0.0, torch.float64)
    x_prev, ynorm, betas = torch.zeros_like(x), 1.0, []
    for _ in range(60):
        ax = a @ x
        lam = torch.dot(x, ax)
        step = window.step(x, ax, ax - lam * x)
        beta = estimator.update(step.scalars.tolist(), float(lam), 1.0) if step is not None else 0.0
        betas.append(beta)
        y = ax - (beta / ynorm) * x_prev
        window.remember(x, ax)
        ynorm = float(torch.linalg.vector_norm(y))
        x_prev, x = x, y / ynorm
    assert max(betas) <= 0.95**2 / 4 and betas[-1] >= 0.9 * 0.95**2 / 4
    assert all(b1 <= b2 for b1, b2 in zip(betas, betas[1:]))  # the largest bound so far


def test_momentum_bound_is_zero_for_nonfinite_or_tiny_values():
    assert momentum_bound((1.0, 0.5), 1.0, 0.0, 0.0) == 0.25**2
    assert momentum_bound((1.0, 0.5), 1.0, 0.0, 0.6) == 0.0
    assert momentum_bound((1.0, float("nan")), 1.0, 0.0, 0.0) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_gives_the_cpu_answer(dtype):
    a, _, _ = planted_matrix(SPECTRA["cluster"], seed=3, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    results = {}
    for device in ("cpu", "cuda"):
        results[device] = deflated_power_iteration(MatrixOperator(a.to(device)), 3, power_iter_steps=5000,
                                                   power_iter_err_threshold=tol, momentum=None, to_numpy=False,
                                                   verbose=False)
        assert results[device].converged.all()
    assert results["cuda"].eigenvectors.device.type == "cuda"
    assert np.allclose(results["cuda"].eigenvalues.cpu().numpy(), results["cpu"].eigenvalues.numpy(),
                       rtol=1e-9 if dtype == torch.float64 else 1e-5)
    # the same method: product counts may differ only by rounding-level decisions
    assert abs(results["cuda"].num_products - results["cpu"].num_products) <= 0.1 * results["cpu"].num_products


def test_window_ritz_residual_estimate_matches_the_measured_one():
    a, _, q = planted_matrix(SPECTRA["outliers"], seed=6)
    gen = torch.Generator().manual_seed(2)
    window = LastTwoIterates()
    for closeness in (1.0, 1e-2, 1e-4):
        first = q[:, :2] @ torch.randn(2, generator=gen, dtype=torch.float64)
        first = first + closeness * torch.randn(100, generator=gen, dtype=torch.float64)
        first = first / torch.linalg.vector_norm(first)
        second = a @ first
        second = second / torch.linalg.vector_norm(second)
        window.remember(first, a @ first)
        ax = a @ second
        lam = torch.dot(second, ax)
        step = window.step(second, ax, ax - lam * second)
        choice = window.ritz_choice(step.scalars.tolist(), float(lam), 1.0, 0.0)
        ritz_lam, ritz_vec, ritz_res = window.ritz_vector(step, choice.coeffs)
        assert abs(float(ritz_lam) - choice.value) <= 1e-12 * 10
        measured = float(torch.linalg.vector_norm(a @ ritz_vec - ritz_lam * ritz_vec))
        assert abs(measured - float(ritz_res)) <= 1e-12 and abs(measured - choice.estimated_residual) <= 1e-7 * measured + 1e-12
