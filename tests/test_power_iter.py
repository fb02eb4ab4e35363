"""Power iteration (plain, momentum, deflated) on matrices with planted spectra."""

import warnings

import numpy as np
import pytest
import torch

from hessian_eigenthings import (
    ConvergenceWarning,
    LambdaOperator,
    MatrixOperator,
    deflated_power_iteration,
    power_iteration,
)
from helpers import abs_cosines, exact_top, planted_matrix

# With error_threshold=1e-6 on a float64 operator, power iteration reaches eigenvalues to 1e-9
# relative and eigenvectors to |cos| >= 0.99999 on these spectra; with the default 1e-4, eigenvalues
# are good to about 1e-7 relative (the error is of order residual**2 / gap).
SPECTRUM = [10.0, -8.0, 7.0, 5.5, -4.0] + list(np.linspace(-2.0, 2.0, 95))


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_deflated_power_iteration_matches_eigh(which):
    a, _, _ = planted_matrix(SPECTRUM, seed=1)
    vals, vecs = exact_top(a, 4, which)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = deflated_power_iteration(a, 4, power_iter_steps=6000, power_iter_err_threshold=1e-6,
                                          which=which, verbose=False)
    got_vals, got_vecs = result
    assert isinstance(got_vals, np.ndarray) and got_vals.shape == (4,) and got_vecs.shape == (4, 100)
    assert np.allclose(got_vals, vals, rtol=1e-9, atol=0)
    assert np.all(abs_cosines(got_vecs, vecs) >= 0.99999)
    assert np.allclose(np.linalg.norm(got_vecs, axis=1), 1.0, atol=1e-12)
    assert np.all(result.converged) and np.all(result.relative_residuals <= 1e-6)
    assert result.num_products > 0


def test_default_threshold_accuracy():
    a, _, _ = planted_matrix(SPECTRUM, seed=2)
    vals, vecs = exact_top(a, 3, "LM")
    result = deflated_power_iteration(a, 3, power_iter_steps=2000, verbose=False)
    assert np.all(result.relative_residuals <= 1e-4)
    assert np.allclose(result.eigenvalues, vals, rtol=1e-6, atol=0)
    assert np.all(abs_cosines(result.eigenvectors, vecs) >= 0.9999)


def test_single_power_iteration_returns_float_and_tensor():
    a, _, q = planted_matrix(SPECTRUM, seed=3)
    value, vector = power_iteration(a, steps=2000, error_threshold=1e-8, verbose=False)
    assert isinstance(value, float) and isinstance(vector, torch.Tensor) and vector.shape == (100,)
    assert abs(value - 10.0) <= 1e-12 * 10
    assert abs(float(vector @ q[:, 0])) >= 1 - 1e-12


def test_momentum_needs_fewer_products_and_returns_the_true_eigenvalue():
    # lambda_1 = 1, lambda_2 = 0.9: plain power iteration converges like 0.9**t; with
    # beta = lambda_2**2 / 4 the accelerated method converges like ~0.63**t (De Sa et al.).
    spectrum = [1.0, 0.9] + list(np.linspace(0.0, 0.85, 198))
    a, _, q = planted_matrix(spectrum, seed=4)
    # products of the search alone: the repeated-eigenvalue check after it costs both the same
    plain = power_iteration(a, steps=5000, error_threshold=1e-7, momentum=0.0, verbose=False,
                            check_multiplicity=False)
    fast = power_iteration(a, steps=5000, error_threshold=1e-7, momentum=0.9**2 / 4, verbose=False,
                           check_multiplicity=False)
    assert plain.converged.all() and fast.converged.all()
    assert abs(fast.eigenvalues - 1.0) <= 1e-9  # not lambda - beta
    assert abs(float(fast.eigenvectors @ q[:, 0])) >= 0.99999
    assert fast.num_products * 2.5 <= plain.num_products, (fast.num_products, plain.num_products)


def test_unconverged_solve_warns_with_residuals_and_advice():
    a, _, _ = planted_matrix([1.0, 0.99] + [0.5] * 48, seed=5)
    with pytest.warns(ConvergenceWarning, match=r"power_iter_steps \(now 5\)") as record:
        result = deflated_power_iteration(a, 2, power_iter_steps=5, verbose=False)
    assert "||Av-lambda v||/|lambda|=" in str(record[0].message)
    assert not result.converged.all()
    with pytest.warns(ConvergenceWarning, match=r"steps \(now 3\)"):
        power_iteration(a, steps=3, verbose=False)


def test_init_vec_is_used():
    a, _, q = planted_matrix(SPECTRUM, seed=6)
    result = power_iteration(a, steps=50, init_vec=q[:, 0], verbose=False, check_multiplicity=False)
    assert result.num_products == 1 and result.converged.all()
    warm = deflated_power_iteration(a, 3, power_iter_steps=50, init_vecs=q[:, [0, 1, 2]].T, verbose=False,
                                    check_multiplicity=False)
    assert warm.num_products == 3 + 3  # one product per pair, then one Rayleigh-Ritz block of 3
    assert np.allclose(warm.eigenvalues, [10.0, -8.0, 7.0], rtol=1e-12)


def test_works_on_lambda_operator_and_leaves_global_rng_alone():
    a, _, _ = planted_matrix(SPECTRUM, seed=7, dtype=torch.float32)
    op = LambdaOperator(lambda v: a @ v, 100)
    state = torch.get_rng_state()
    result = deflated_power_iteration(op, 2, power_iter_steps=3000, to_numpy=False, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    # eigenvalues are float64 from every solver; the vectors keep the operator's dtype
    assert isinstance(result.eigenvalues, torch.Tensor) and result.eigenvalues.dtype == torch.float64
    assert result.eigenvectors.dtype == torch.float32
    assert torch.allclose(result.eigenvalues, torch.tensor([10.0, -8.0], dtype=torch.float64), rtol=1e-5)
    assert op.num_products == result.num_products


def test_same_seed_same_answer_and_bad_arguments():
    a, _, _ = planted_matrix(SPECTRUM, seed=8)
    op = MatrixOperator(a)
    first = deflated_power_iteration(op, 2, power_iter_steps=500, seed=3, verbose=False)
    second = deflated_power_iteration(op, 2, power_iter_steps=500, seed=3, verbose=False)
    assert np.array_equal(first.eigenvectors, second.eigenvectors)
    with pytest.raises(ValueError, match="momentum"):
        power_iteration(op, momentum=-1.0)
    with pytest.raises(ValueError, match="error_threshold"):
        power_iteration(op, error_threshold=0.0)
    with pytest.raises(ValueError, match=r"init_vec.*shape"):
        power_iteration(op, init_vec=torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="zero vector"):
        power_iteration(op, init_vec=torch.zeros(100, dtype=torch.float64))
    with pytest.raises(ValueError, match="smaller than"):
        deflated_power_iteration(op, 100)
    with pytest.warns(UserWarning, match="fp16"):
        power_iteration(op, steps=2000, fp16=True, verbose=False)


def test_warm_start_also_serves_the_shift_solve_of_la():
    a, _, q = planted_matrix(SPECTRUM, seed=9)
    # LA: top algebraic eigenvalues 10, 7; the largest-magnitude one (10) is also the top LA one
    warm = deflated_power_iteration(a, 2, power_iter_steps=3000, which="LA", init_vecs=q[:, [0, 2]].T,
                                    verbose=False, check_multiplicity=False)
    cold = deflated_power_iteration(a, 2, power_iter_steps=3000, which="LA", verbose=False, check_multiplicity=False)
    assert np.allclose(warm.eigenvalues, [10.0, 7.0], rtol=1e-9)
    assert warm.num_products == 1 + 1 + 2  # shift solve, second pair, Rayleigh-Ritz
    assert cold.num_products > 5 * warm.num_products


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_la_sa_find_the_right_end_when_the_shift_solve_cannot_converge(which):
    # -10 and 9.99 have nearly equal magnitude: within 200 steps the largest-magnitude solve that
    # sets the shift returns a mixture of both, whose Rayleigh quotient is far below 10. The shift
    # must still reach the wanted end, and the mixture must not be deflated as an eigenvector.
    spectrum = [-10.0, 9.99, -5.0, 4.0] + list(np.linspace(-1.0, 1.0, 96))
    a, _, _ = planted_matrix(spectrum, seed=0)
    vals, vecs = exact_top(a, 2, which)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = deflated_power_iteration(a, 2, power_iter_steps=200, power_iter_err_threshold=1e-6, which=which,
                                          verbose=False)
    assert np.allclose(result.eigenvalues, vals, rtol=1e-9)
    assert np.all(abs_cosines(result.eigenvectors, vecs) >= 0.9999)


def test_non_finite_momentum_is_refused_and_too_much_momentum_is_named_in_the_warning():
    a, _, _ = planted_matrix(SPECTRUM, seed=10)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="momentum must be a finite number"):
            power_iteration(a, momentum=bad, verbose=False)
    with pytest.raises(ValueError, match="power_iter_err_threshold"):
        deflated_power_iteration(a, 2, power_iter_err_threshold=float("nan"), verbose=False)
    # beta = 30 is above 10**2 / 4 = 25: the iteration stalls, and the advice says so.
    with pytest.warns(ConvergenceWarning, match=r"momentum \(now 30\) is below lambda\*\*2 / 4"):
        power_iteration(a, steps=200, momentum=30.0, verbose=False)


def test_convergence_warning_points_at_the_callers_line(mlp_problem):
    from torch import nn

    from hessian_eigenthings import compute_hessian_eigenthings

    model, loader, _, _, _ = mlp_problem
    with pytest.warns(ConvergenceWarning) as record:
        compute_hessian_eigenthings(model, loader, nn.functional.cross_entropy, 2, use_gpu=False, verbose=False,
                                    power_iter_steps=2)
    assert record[0].filename == __file__
