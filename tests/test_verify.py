"""The multiplicity check: missed copies of repeated eigenvalues are found, against numpy.linalg.eigh."""

import inspect
import warnings

import numpy as np
import pytest
import torch

from hessian_eigenthings import LambdaOperator, MatrixOperator, lanczos, thick_restart_lanczos
from hessian_eigenthings.solvers import verify
from hessian_eigenthings.solvers.verify import christoffel_bound, complete_multiplicities, miss_probability
from helpers import mini_batch_like, planted_matrix

SOLVERS = {"thick_restart": thick_restart_lanczos, "lanczos": lanczos}


def _extremeness(values: np.ndarray, which: str) -> np.ndarray:
    return np.abs(values) if which == "LM" else (values if which == "LA" else -values)


def _solve(solver: str, matrix: torch.Tensor, k: int, which: str, tol: float):
    """What a public solver returns without the check, as the check's inputs: values (k,), vectors (n, k)."""
    solve = SOLVERS[solver]
    # where the solvers run this check themselves, turn it off: the inputs must be the raw solve
    off = {"check_multiplicity": False} if "check_multiplicity" in inspect.signature(solve).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = solve(matrix, k, which=which, tol=tol, verbose=False, **off)
    values = torch.as_tensor(result.eigenvalues, dtype=matrix.dtype)
    vectors = torch.as_tensor(result.eigenvectors, dtype=matrix.dtype).T.contiguous()
    return values, vectors


def _assert_true_top_k(matrix: torch.Tensor, completion, k: int, which: str, value_tol: float, tol: float):
    """Values equal eigh's top k; the vectors span (a k-dimensional part of) the eigenspace of the
    eigenvalues at least as extreme as the k-th one (ties at the k-th value make any part right);
    they are orthonormal and each pair meets the tolerance."""
    exact, basis = np.linalg.eigh(matrix.double().numpy())
    order = np.argsort(-_extremeness(exact, which), kind="stable")
    exact, basis = exact[order], basis[:, order]
    scale = np.abs(exact).max()
    values = completion.values.double().cpu().numpy()
    vectors = completion.vectors.double().cpu().numpy()
    assert np.allclose(values, exact[:k], rtol=0, atol=value_tol * scale), (values, exact[:k])
    kth = _extremeness(exact, which)[k - 1]
    space = basis[:, _extremeness(exact, which) >= kth - 1e-7 * scale]
    cosines = np.linalg.svd(space.T @ vectors, compute_uv=False)
    assert cosines.min() >= 1 - 1e-6, cosines
    assert np.allclose(vectors.T @ vectors, np.eye(k), atol=1e-6)
    residuals = np.linalg.norm(matrix.double().numpy() @ vectors - vectors * values, axis=0)
    assert np.all(residuals <= np.maximum(2 * tol * np.abs(values), 1e-5 * scale * (matrix.dtype == torch.float32)))


def _bulk(count: int, low: float = -1.0, high: float = 0.9) -> list:
    return list(np.linspace(low, high, count))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("multiplicity", [2, 3, 4, 5])
@pytest.mark.parametrize("which", ["LA", "LM"])
def test_missed_copies_of_the_top_eigenvalue_are_found(solver, multiplicity, which):
    spectrum = [5.0] * multiplicity + [4.0, 3.5] + _bulk(100 - multiplicity - 2)
    a, _, _ = planted_matrix(spectrum, seed=multiplicity)
    for k in (3, multiplicity + 1):
        values, vectors = _solve(solver, a, k, which, 1e-10)
        done = complete_multiplicities(MatrixOperator(a), values, vectors, which, 1e-10, 0)
        _assert_true_top_k(a, done, k, which, 1e-8, 1e-10)
        copies_given = int(np.sum(np.abs(values.numpy() - 5.0) < 1e-6))
        assert done.missed == min(k, multiplicity) - copies_given
        if done.missed == 0:  # nothing missing: the input comes back untouched
            assert done.values is values and done.vectors is vectors


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_a_repeated_eigenvalue_inside_the_wanted_set(solver):
    spectrum = [6.0, 5.0, 5.0, 5.0, 4.0, 3.0] + _bulk(94)
    a, _, _ = planted_matrix(spectrum, seed=21)
    values, vectors = _solve(solver, a, 5, "LA", 1e-10)
    done = complete_multiplicities(MatrixOperator(a), values, vectors, "LA", 1e-10, 0)
    _assert_true_top_k(a, done, 5, "LA", 1e-8, 1e-10)


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("which", ["SA", "LM"])
def test_negative_repeated_eigenvalues(solver, which):
    spectrum = [-5.0, -5.0, -5.0, 4.9, 3.0, -2.5] + _bulk(94, -1.0, 1.1)
    a, _, _ = planted_matrix(spectrum, seed=8)
    values, vectors = _solve(solver, a, 4, which, 1e-10)
    done = complete_multiplicities(MatrixOperator(a), values, vectors, which, 1e-10, 1)
    _assert_true_top_k(a, done, 4, which, 1e-8, 1e-10)


def test_float32_operator():
    spectrum = [5.0] * 3 + [4.0, 3.5] + _bulk(95)
    a, _, _ = planted_matrix(spectrum, seed=3, dtype=torch.float32)
    values, vectors = _solve("thick_restart", a, 3, "LA", 1e-5)
    assert values.dtype == torch.float32 and np.allclose(values.numpy(), [5.0, 4.0, 3.5], atol=1e-4)
    done = complete_multiplicities(MatrixOperator(a), values, vectors, "LA", 1e-5, 0)
    assert done.missed == 2 and done.values.dtype == torch.float32 and done.vectors.dtype == torch.float32
    _assert_true_top_k(a, done, 3, "LA", 1e-5, 1e-5)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_any_missed_eigenvalue_is_found_not_only_copies(which):
    spectrum = [6.0, 5.0, 4.0, 3.0, -5.5, -4.5] + _bulk(94, -1.0, 1.1)
    a, lam, q = planted_matrix(spectrum, seed=2)
    exact = lam.numpy()
    order = np.argsort(-_extremeness(exact, which), kind="stable")
    # give it the 1st, 3rd and 4th most extreme pairs: the 2nd is missing
    chosen = order[[0, 2, 3]]
    done = complete_multiplicities(MatrixOperator(a), lam[chosen], q[:, chosen], which, 1e-10, 0)
    assert done.missed == 1
    _assert_true_top_k(a, done, 3, which, 1e-8, 1e-10)


@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_nothing_missing_costs_few_products_and_changes_nothing(which):
    spectrum = [6.0, 5.0, 4.0, 3.0, -5.5, -4.5, -3.5] + _bulk(93, -1.0, 1.1)
    a, lam, q = planted_matrix(spectrum, seed=4)
    order = np.argsort(-_extremeness(lam.numpy(), which), kind="stable")[:3]
    values, vectors = lam[order], q[:, order]
    residuals = torch.zeros(3, dtype=torch.float64)
    op = MatrixOperator(a)
    done = complete_multiplicities(op, values, vectors, which, 1e-8, 0, residuals=residuals)
    assert done.missed == 0 and done.values is values and done.vectors is vectors and done.residuals is residuals
    assert done.num_products == op.num_products <= 8, done.num_products  # measured: LM 8, LA 8, SA 6
    assert done.miss_probability <= verify.MISS_PROBABILITY


def test_residuals_are_nan_when_not_given_and_nothing_changed():
    a, lam, q = planted_matrix([3.0, 2.0, 1.0] + _bulk(47), seed=6)
    done = complete_multiplicities(MatrixOperator(a), lam[:2], q[:, :2], "LA", 1e-8, 0)
    assert done.missed == 0 and torch.isnan(done.residuals).all() and done.residuals.shape == (2,)


def test_exact_zero_operator():
    n = 30
    op = LambdaOperator(lambda v: torch.zeros_like(v), n, dtype=torch.float64)
    vectors = torch.linalg.qr(torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    for which in ("LM", "LA", "SA"):
        done = complete_multiplicities(op, torch.zeros(3, dtype=torch.float64), vectors, which, 1e-6, 0)
        assert done.missed == 0 and done.miss_probability == 0.0 and done.num_products <= 2


@pytest.mark.parametrize("k", [7, 8, 9])
def test_k_close_to_n(k):
    spectrum = [4.0, 4.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.125, -0.1]
    a, lam, q = planted_matrix(spectrum, seed=1)
    # one copy of 4 missing: pairs 1..k+1 except the second
    chosen = [0] + list(range(2, k + 1))
    done = complete_multiplicities(MatrixOperator(a), lam[chosen], q[:, chosen], "LA", 1e-10, 0)
    assert done.missed == 1
    _assert_true_top_k(a, done, k, "LA", 1e-8, 1e-10)
    # all n pairs given: nothing can be missing, no product
    full = complete_multiplicities(MatrixOperator(a), lam, q, "LA", 1e-10, 0)
    assert full.missed == 0 and full.num_products == 0


def test_same_seed_same_answer_and_the_global_rng_is_left_alone():
    spectrum = [5.0] * 3 + [4.0, 3.5] + _bulk(95)
    a, _, _ = planted_matrix(spectrum, seed=3)
    values, vectors = _solve("thick_restart", a, 3, "LA", 1e-10)
    state = torch.get_rng_state()
    first = complete_multiplicities(MatrixOperator(a), values, vectors, "LA", 1e-10, 7)
    second = complete_multiplicities(MatrixOperator(a), values, vectors, "LA", 1e-10, 7)
    fresh = complete_multiplicities(MatrixOperator(a), values, vectors, "LA", 1e-10, None)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.vectors, second.vectors) and first.num_products == second.num_products
    assert first.missed == 2
    # Fresh randomness: a copy goes unseen with at most the stated probability (MISS_PROBABILITY);
    # what is found is right either way.
    assert 1 <= fresh.missed <= 2 and torch.allclose(fresh.values[:1 + fresh.missed].double(),
                                                     torch.full((1 + fresh.missed,), 5.0, dtype=torch.float64))


def test_the_host_reads_the_small_matrices_less_often_than_once_per_product(monkeypatch):
    spectrum = [5.0] * 3 + [4.0, 3.5] + _bulk(95)
    a, _, _ = planted_matrix(spectrum, seed=3)
    values, vectors = _solve("thick_restart", a, 3, "LA", 1e-10)
    reads = []
    original = verify._DeflatedLanczos.snapshot

    def counted(self):
        reads.append(self.steps)
        return original(self)

    monkeypatch.setattr(verify._DeflatedLanczos, "snapshot", counted)
    done = complete_multiplicities(MatrixOperator(a), values, vectors, "LA", 1e-10, 0)
    assert done.missed == 2
    assert len(reads) <= 0.6 * done.num_products, (len(reads), done.num_products)


def test_stochastic_operator_is_not_checked():
    a, lam, q = planted_matrix([3.0, 2.0, 1.0] + _bulk(47), seed=6)
    op = mini_batch_like(a, 0.1, seed=0)
    done = complete_multiplicities(op, lam[:2], q[:, :2], "LA", 1e-8, 0)
    assert done.num_products == 0 and done.missed == 0 and done.miss_probability == 1.0


def test_christoffel_bound_is_the_least_squares_minimum():
    # min over polynomials p of degree < m with p(x) = 1 of sum_j w_j p(theta_j)^2, by brute force
    gen = np.random.default_rng(0)
    for m in (1, 2, 4, 7):
        nodes = np.sort(gen.uniform(-1, 1, m))
        weights = gen.uniform(0.1, 1.0, m)
        weights /= weights.sum()
        for point in (1.1, 1.5, -1.3, 3.0):
            vander = np.vander(nodes, m, increasing=True) * np.sqrt(weights)[:, None]
            at_point = np.vander([point], m, increasing=True)[0]
            # minimise ||V c||^2 subject to at_point . c = 1: c = G^-1 a / (a^T G^-1 a)
            gram = vander.T @ vander
            solved = np.linalg.solve(gram, at_point)
            expected = 1.0 / float(at_point @ solved)
            assert np.isclose(christoffel_bound(nodes, weights, point), min(1.0, expected), rtol=1e-6)


def test_miss_probability_bounds_the_chance_of_a_small_component():
    gen = torch.Generator().manual_seed(0)
    for dim in (5, 200):
        samples = torch.randn(20000, dim, generator=gen, dtype=torch.float64)
        mass = (samples[:, 0] ** 2 / (samples**2).sum(dim=1)).numpy()
        for t in (1e-4 / dim, 1e-2 / dim, 0.1 / dim):
            assert np.mean(mass <= t) <= miss_probability(t, dim) + 0.005


def test_bad_shapes_are_refused():
    a, lam, q = planted_matrix([3.0, 2.0, 1.0] + _bulk(47), seed=6)
    with pytest.raises(ValueError, match=r"vectors must have shape \(n, k\)"):
        complete_multiplicities(MatrixOperator(a), lam[:2], q[:, :3], "LA", 1e-8, 0)
    with pytest.raises(ValueError, match="which"):
        complete_multiplicities(MatrixOperator(a), lam[:2], q[:, :2], "XX", 1e-8, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_keeps_every_vector_on_the_device(dtype):
    spectrum = [5.0] * 3 + [4.0, 3.5] + _bulk(95)
    a, _, _ = planted_matrix(spectrum, seed=3, dtype=dtype)
    values, vectors = _solve("thick_restart", a, 3, "LA", 1e-5)
    cuda = a.cuda()
    done = complete_multiplicities(MatrixOperator(cuda), values.cuda(), vectors.cuda(), "LA", 1e-5, 0)
    assert done.missed == 2 and done.vectors.device.type == "cuda" and done.values.device.type == "cuda"
    host = type(done)(done.values.cpu(), done.vectors.cpu(), done.residuals.cpu(), done.num_products, done.missed)
    _assert_true_top_k(a, host, 3, "LA", 1e-5 if dtype == torch.float32 else 1e-8, 1e-5)


# -- end to end: every solver, with the check its shared finish runs --------------------------------

def _every_solver():
    from hessian_eigenthings import block_lanczos, compute_hessian_eigenthings, deflated_power_iteration  # noqa: F401

    return {
        "power_iter": lambda a, k, which: deflated_power_iteration(a, k, which=which, tol=1e-8, verbose=False),
        "lanczos": lambda a, k, which: lanczos(a, k, which=which, tol=1e-8, verbose=False),
        "thick_restart": lambda a, k, which: thick_restart_lanczos(a, k, which=which, tol=1e-8, verbose=False),
        "block_lanczos": lambda a, k, which: block_lanczos(a, k, which=which, tol=1e-8, block_size=2, verbose=False),
    }


@pytest.mark.parametrize("multiplicity", [2, 3, 4, 5])
@pytest.mark.parametrize("solver", ["power_iter", "lanczos", "thick_restart", "block_lanczos"])
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_every_solver_returns_every_copy_of_a_repeated_eigenvalue(solver, multiplicity, which):
    """A top eigenvalue repeated `multiplicity` times and two more wanted pairs below it: each solver
    returns all copies (block Lanczos with a block narrower than the multiplicity included), flagged
    converged, with vectors spanning the repeated eigenspace."""
    sign = 1.0 if which == "LA" else -1.0
    spectrum = [sign * 5.0] * multiplicity + [sign * 4.0, sign * 3.5] + list(sign * np.linspace(-2.0, 3.0, 90))
    a, _, q = planted_matrix(spectrum, seed=multiplicity)
    k = multiplicity + 2
    result = _every_solver()[solver](a, k, which)
    expected = np.array(spectrum[:k])
    assert result.converged.all(), (solver, result.eigenvalues)
    np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-7, atol=1e-7)
    # the returned vectors of the repeated value span its whole eigenspace
    vectors = np.asarray(result.eigenvectors, dtype=np.float64)[:multiplicity]
    eigenspace = q[:, :multiplicity].numpy()
    overlap = np.linalg.svd(vectors @ eigenspace, compute_uv=False)
    assert overlap.min() > 1 - 1e-6, overlap
    check = result.info["multiplicity_check"]
    assert check["missed"] >= 0 and check["products"] >= 1
