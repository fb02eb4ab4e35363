"""The native solvers (thick-restart Lanczos, block Lanczos) against exact answers and against ARPACK."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    ConvergenceWarning,
    HVPOperator,
    LambdaOperator,
    MatrixOperator,
    Operator,
    block_lanczos,
    compute_hessian_eigenthings,
    thick_restart_lanczos,
)
from helpers import abs_cosines, assert_model_unchanged, exact_top, model_snapshot, planted_matrix

F = nn.functional

# Indefinite, with no two eigenvalues of equal magnitude (ties would make the "LM" order ambiguous).
MIXED = [10.0, -8.0, 7.0, 5.5, -4.0, 3.9] + list(np.linspace(-2.0, 1.95, 294))
# Clusters at both ends: gaps of 1e-3 relative at the top, 5e-4 at the bottom.
CLUSTERED = [10.0, 9.99, 9.98, 9.97, -6.0, -5.997] + list(np.linspace(-5.0, 9.5, 294))

SOLVERS = {
    "thick_restart": lambda op, k, **kw: thick_restart_lanczos(op, k, verbose=False, **kw),
    "block3": lambda op, k, **kw: block_lanczos(op, k, block_size=3, verbose=False, **kw),
    "block_default": lambda op, k, **kw: block_lanczos(op, k, verbose=False, **kw),
}


def measured_residuals(matrix: torch.Tensor, vals: np.ndarray, vecs: np.ndarray) -> np.ndarray:
    a = matrix.double().numpy()
    return np.linalg.norm(a @ vecs.T - vecs.T * vals, axis=0)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("spectrum,which,k", [
    (MIXED, "LM", 5), (MIXED, "LA", 4), (MIXED, "SA", 3),
    (CLUSTERED, "LA", 4), (CLUSTERED, "SA", 2), (CLUSTERED, "LM", 5),
])
def test_planted_spectra_match_eigh(solver, spectrum, which, k):
    a, _, _ = planted_matrix(spectrum, seed=1)
    op = MatrixOperator(a)
    vals, vecs = exact_top(a, k, which)
    result = SOLVERS[solver](op, k, which=which, tol=1e-10)
    got_vals, got_vecs = result
    assert isinstance(got_vals, np.ndarray) and got_vals.shape == (k,) and got_vals.dtype == np.float64
    assert isinstance(got_vecs, np.ndarray) and got_vecs.shape == (k, a.shape[0])
    assert np.allclose(got_vals, vals, rtol=1e-6, atol=0)
    assert np.all(abs_cosines(got_vecs, vecs) >= 0.9999)
    assert np.allclose(got_vecs @ got_vecs.T, np.eye(k), atol=1e-10)
    assert result.converged.all() and np.all(result.relative_residuals <= 1e-10)
    # The residuals come from the Krylov-Schur relation; they are the measured ones up to rounding.
    assert np.allclose(result.residuals, measured_residuals(a, got_vals, got_vecs), rtol=0, atol=1e-12)
    assert result.num_products == op.num_products


def test_block_finds_a_repeated_eigenvalue():
    """A triple eigenvalue at the top: a block of 3 holds all three copies."""
    a, _, q = planted_matrix([7.0, 7.0, 7.0, 5.0] + list(np.linspace(-1.0, 4.0, 196)), seed=2)
    result = block_lanczos(a, 3, which="LA", block_size=3, tol=1e-10, verbose=False)
    assert np.allclose(result.eigenvalues, 7.0, rtol=1e-9)
    top = q[:, :3].numpy()  # the exact eigenspace of 7
    inside = np.linalg.norm(top.T @ result.eigenvectors.T, axis=0)
    assert np.all(inside >= 1 - 1e-9)
    assert np.allclose(result.eigenvectors @ result.eigenvectors.T, np.eye(3), atol=1e-10)


def test_invariant_subspace_breakdown_single_vector():
    """Four distinct eigenvalues: the Krylov space is invariant after four steps, so the fifth
    Lanczos vector is rounding noise. The solver goes on in a fresh direction without NaN."""
    a, _, q = planted_matrix([7.0, 5.0] + [2.0] * 29 + [1.0] * 29, seed=3)
    result = thick_restart_lanczos(MatrixOperator(a), 3, which="LA", tol=1e-10, verbose=False)
    assert np.allclose(result.eigenvalues, [7.0, 5.0, 2.0], rtol=1e-9)
    assert np.all(abs_cosines(result.eigenvectors[:2], q[:, :2].numpy().T) >= 1 - 1e-9)
    assert np.linalg.norm(q[:, 2:31].numpy().T @ result.eigenvectors[2]) >= 1 - 1e-9
    assert np.allclose(result.eigenvectors @ result.eigenvectors.T, np.eye(3), atol=1e-10)


def test_invariant_subspace_breakdown_block():
    """Three distinct eigenvalues, 20 copies each: a block of 3 finds three copies of the top one
    (a single start vector sees one copy per breakdown, like ARPACK)."""
    a, _, q = planted_matrix([1.0] * 20 + [2.0] * 20 + [7.0] * 20, seed=3)
    result = block_lanczos(MatrixOperator(a), 3, which="LA", block_size=3, tol=1e-10, verbose=False)
    assert np.allclose(result.eigenvalues, 7.0, rtol=1e-9)
    inside = np.linalg.norm(q[:, 40:].numpy().T @ result.eigenvectors.T, axis=0)
    assert np.all(inside >= 1 - 1e-9)
    assert np.allclose(result.eigenvectors @ result.eigenvectors.T, np.eye(3), atol=1e-10)


def test_exact_zero_residual_and_zero_operator():
    """Warm start with exact eigenvectors of a diagonal operator makes the next Lanczos vector exactly
    zero; the zero operator has nothing but zero. Neither may produce NaN."""
    diag = torch.linspace(1.0, 50.0, 200, dtype=torch.float64)
    op = LambdaOperator(lambda v: diag * v, 200, dtype=torch.float64)
    exact = torch.eye(200, dtype=torch.float64)[[199, 198, 197]]
    result = thick_restart_lanczos(op, 3, which="LA", init_vecs=exact, verbose=False, check_multiplicity=False)
    assert np.allclose(result.eigenvalues, [50.0, 50.0 - 49 / 199, 50.0 - 98 / 199], rtol=1e-12)
    assert np.all(abs_cosines(result.eigenvectors, exact.numpy()) >= 1 - 1e-12)
    assert result.num_products <= 6

    zero = LambdaOperator(lambda v: torch.zeros_like(v), 50, dtype=torch.float64)
    for solve in (thick_restart_lanczos, block_lanczos):
        vals, vecs = solve(zero, 2, verbose=False)
        assert np.all(vals == 0) and np.all(np.isfinite(vecs))
        assert np.allclose(vecs @ vecs.T, np.eye(2), atol=1e-12)


@pytest.mark.parametrize("solver,spectrum,k,at_most", [
    ("thick_restart", CLUSTERED, 1, 1 / 3),   # the sharpness-tracking case: one vector, close to the answer
    ("thick_restart", MIXED, 4, 0.8),         # several vectors: the start vector is their sum
    ("block4", CLUSTERED, 4, 1 / 2),          # several vectors, each its own column of the first block
])
def test_warm_start_cuts_products(solver, spectrum, k, at_most):
    solve = SOLVERS[solver] if solver in SOLVERS else (lambda op, k, **kw: block_lanczos(op, k, block_size=4,
                                                                                        verbose=False, **kw))
    a, _, _ = planted_matrix(spectrum, seed=4)
    cold = solve(MatrixOperator(a), k, which="LA", tol=1e-4)
    gen = torch.Generator().manual_seed(0)
    # Each vector moved by about 2% (1e-3 per entry of a unit vector of 300 entries).
    nearby = torch.from_numpy(cold.eigenvectors) + 1e-3 * torch.randn(k, 300, generator=gen, dtype=torch.float64)
    warm = solve(MatrixOperator(a), k, which="LA", tol=1e-4, init_vecs=nearby)
    print(f"{solver}, k={k}: cold start {cold.num_products} products, warm start {warm.num_products}")
    assert warm.converged.all()
    assert np.allclose(warm.eigenvalues, cold.eigenvalues, rtol=1e-6)
    assert warm.num_products <= at_most * cold.num_products


@pytest.mark.parametrize("solver,which,k", [
    ("thick_restart", "LM", 6), ("block_default", "LA", 6), ("thick_restart", "SA", 3),
])
def test_model_hessian_matches_dense_eigh(mlp_problem, solver, which, k):
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    vals, vecs = exact_top(hessian, k, which)
    result = SOLVERS[solver](op, k, which=which, tol=1e-9)
    assert np.allclose(result.eigenvalues, vals, rtol=1e-6, atol=0)
    spectrum = np.linalg.eigvalsh(hessian.numpy())
    gaps = np.sort(np.abs(spectrum[None, :] - vals[:, None]), axis=1)[:, 1]
    separated = gaps > 1e-3 * abs(vals[0])
    assert separated.sum() >= 2
    assert np.all(abs_cosines(result.eigenvectors[separated], vecs[separated]) >= 0.9999)
    assert np.allclose(result.residuals, measured_residuals(hessian, result.eigenvalues, result.eigenvectors),
                       rtol=0, atol=1e-10 * abs(vals[0]))
    assert result.num_products == op.num_products


@pytest.mark.parametrize("k", [1, 10])
def test_fewer_products_than_arpack_on_model_hessian(mlp_problem, k):
    """Top-1 and top-10 to 1e-4 relative residual. ARPACK's num_products includes k products that
    measure its residuals after the solve; the native solver needs fewer than the solve alone."""
    model, loader, _, _, hessian = mlp_problem
    common = dict(num_eigenthings=k, use_gpu=False, verbose=False, tol=1e-4)
    arpack = compute_hessian_eigenthings(model, loader, F.cross_entropy, mode="lanczos", **common)
    native = compute_hessian_eigenthings(model, loader, F.cross_entropy, mode="thick_restart", **common)
    print(f"top-{k}: ARPACK {arpack.num_products} products ({arpack.num_products - k} in eigsh), "
          f"thick restart {native.num_products}")
    assert native.num_products < arpack.num_products - k
    assert native.converged.all()
    measured = measured_residuals(hessian, native.eigenvalues, native.eigenvectors) / np.abs(native.eigenvalues)
    assert np.all(measured <= 1e-4)
    assert np.allclose(native.eigenvalues, arpack.eigenvalues, rtol=1e-4)


@pytest.mark.parametrize("mode", ["thick_restart", "block_lanczos", "auto"])
def test_modes_of_the_one_call_api(mlp_problem, mode):
    model, loader, _, _, hessian = mlp_problem
    before = model_snapshot(model)
    vals, _ = exact_top(hessian, 4, "LA")
    result = compute_hessian_eigenthings(model, loader, F.cross_entropy, 4, mode=mode, which="LA",
                                         use_gpu=False, verbose=False, tol=1e-8)
    eigenvals, eigenvecs = result
    assert isinstance(eigenvals, np.ndarray) and isinstance(eigenvecs, np.ndarray)
    assert eigenvecs.shape == (4, hessian.shape[0])
    assert np.allclose(eigenvals, vals, rtol=1e-6, atol=0)
    assert result.info["block_size"] == (1 if mode != "block_lanczos" else 4)
    assert_model_unchanged(model, before)


def test_block_size_through_auto_and_unknown_options(mlp_problem):
    model, loader, _, _, _ = mlp_problem
    result = compute_hessian_eigenthings(model, loader, F.cross_entropy, 2, mode="auto", block_size=2,
                                         use_gpu=False, verbose=False)
    assert result.info["block_size"] == 2
    with pytest.raises(TypeError, match="block_size"):
        compute_hessian_eigenthings(model, loader, F.cross_entropy, 2, mode="thick_restart", block_size=2)


def test_no_host_read_per_product(monkeypatch):
    """Values reach the host only at checkpoints: record the product count at every host read
    (item, float, bool, int, tolist, numpy, cpu, .to(cpu)); reads may happen at no more distinct
    counts than there were checkpoints (plus the start and the end)."""
    a, _, _ = planted_matrix(MIXED, seed=5)
    count = {"products": 0}

    class Counting(Operator):
        """Products with ``a``, counted, and nothing else (LambdaOperator would add a no-op .to())."""

        def _matvec(self, vec):
            count["products"] += 1
            return a @ vec

        def _matmat(self, mat):
            count["products"] += mat.shape[1]
            return a @ mat

    reads_at = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if name != "to" or any(str(x).startswith("cpu") for x in args + tuple(kwargs.values())):
                reads_at.append(count["products"])
            return real(self, *args, **kwargs)

        return wrapper

    for solve, extra in ((thick_restart_lanczos, {}), (block_lanczos, {"block_size": 2})):
        op = Counting(300, dtype=torch.float64)
        start = count["products"]
        reads_at.clear()
        with monkeypatch.context() as patch:
            for name in ("item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy", "cpu", "to"):
                patch.setattr(torch.Tensor, name, spy(name))
            # the solver's own reads (the repeated-eigenvalue check after it is tested in test_verify.py)
            result = solve(op, 6, which="SA", tol=1e-8, verbose=False, check_multiplicity=False, **extra)
        distinct = set(reads_at) - {start}
        products = count["products"] - start
        print(f"{solve.__name__}: {products} products, {result.info['checks']} checkpoints, host reads at "
              f"{len(distinct)} distinct product counts")
        assert products >= 100  # a long solve, so that a read per product would show
        assert result.info["checks"] <= products / 4
        assert len(distinct) <= result.info["checks"] + 1


def test_float32_operator_converges_to_rounding_floor():
    a, _, _ = planted_matrix(MIXED, seed=6, dtype=torch.float32)
    op = MatrixOperator(a)
    result = thick_restart_lanczos(op, 5, which="SA", tol=1e-9, verbose=False, max_steps=60)
    vals, _ = exact_top(a.double(), 5, "SA")
    assert result.converged.all()  # below 10 * eps32 * |lambda|: the floor of float32 products
    assert np.allclose(result.eigenvalues, vals, rtol=1e-5)
    assert np.allclose(result.eigenvectors @ result.eigenvectors.T, np.eye(5), atol=1e-5)
    assert result.eigenvectors.dtype == np.float32


def test_tensors_on_request():
    a, _, _ = planted_matrix(MIXED, seed=7)
    vals, vecs = thick_restart_lanczos(a, 3, to_numpy=False, verbose=False)
    assert isinstance(vals, torch.Tensor) and isinstance(vecs, torch.Tensor)
    assert vals.dtype == torch.float64 and vecs.shape == (3, 300)


def test_out_of_steps_warns_with_advice():
    a, _, _ = planted_matrix([1.0 + 1e-3 * i for i in range(200)], seed=8)
    with pytest.warns(ConvergenceWarning, match="max_steps") as record:
        result = thick_restart_lanczos(a, 5, max_steps=1, num_lanczos_vectors=8, tol=1e-12, verbose=False)
    assert "num_lanczos_vectors" in str(record[0].message)
    assert not result.converged.all()
    assert result.num_products == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thick_restart_lanczos(a, 1, tol=1e-2, verbose=False)


@pytest.mark.parametrize("call,error,match", [
    (lambda a: thick_restart_lanczos(a, 0), ValueError, "num_eigenthings"),
    (lambda a: thick_restart_lanczos(a, 60), ValueError, "num_eigenthings"),
    (lambda a: thick_restart_lanczos(a, 2.0), TypeError, "num_eigenthings"),
    (lambda a: thick_restart_lanczos(a, 2, which="BE"), ValueError, "which"),
    (lambda a: thick_restart_lanczos(a, 2, tol=0), ValueError, "tol"),
    (lambda a: thick_restart_lanczos(a, 2, max_steps=0), ValueError, "max_steps"),
    (lambda a: thick_restart_lanczos(a, 5, num_lanczos_vectors=6), ValueError, "num_lanczos_vectors"),
    (lambda a: thick_restart_lanczos(a, 5, num_lanczos_vectors=61), ValueError, "num_lanczos_vectors"),
    (lambda a: thick_restart_lanczos(a, 2, init_vecs=torch.ones(3, 59, dtype=torch.float64)), ValueError, "init_vecs"),
    (lambda a: thick_restart_lanczos(a, 2, init_vecs=torch.full((60,), float("nan"), dtype=torch.float64)),
     ValueError, "NaN"),
    (lambda a: thick_restart_lanczos(a, 2, init_vecs=[1.0] * 60), TypeError, "init_vecs"),
    (lambda a: thick_restart_lanczos(lambda v: v, 2), TypeError, "LambdaOperator"),
    (lambda a: block_lanczos(a, 10, block_size=30), ValueError, "block_size"),
    (lambda a: block_lanczos(a, 2, block_size=0), ValueError, "block_size"),
    (lambda a: block_lanczos(a, "2"), TypeError, "num_eigenthings"),
])
def test_bad_arguments(call, error, match):
    a, _, _ = planted_matrix(list(range(1, 61)), seed=9)
    with pytest.raises(error, match=match):
        call(a)


def test_default_block_shrinks_to_fit_a_small_operator_but_a_given_one_does_not():
    a, _, _ = planted_matrix(list(np.linspace(1.0, 10.0, 10)), seed=11)
    for k, block in ((9, 1), (4, 2), (2, 2)):
        vals, _ = exact_top(a, k, "LM")
        result = block_lanczos(a, k, tol=1e-10, verbose=False)
        assert result.info["block_size"] == block
        assert result.info["basis_size"] <= 10 - (block if block > 1 else 0)
        assert np.allclose(result.eigenvalues, vals, rtol=1e-9) and result.converged.all()
    # A block of 3 for k = 4 in dimension 10 has no room for the block after a full basis: its extra
    # columns would be noise that is not orthogonal to the basis (this once gave eigenvalues near 7756).
    with pytest.raises(ValueError, match=r"block_size=3 is too large.*num_eigenthings \+ 3 \* block_size <= n"):
        block_lanczos(a, 4, block_size=3, verbose=False)
    with pytest.raises(ValueError, match="num_lanczos_vectors=10 must be between .* n - block_size = 8"):
        block_lanczos(a, 2, block_size=2, num_lanczos_vectors=10, verbose=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["thick_restart", "block3"])
def test_cuda_vectors_stay_on_device_and_sync_only_at_checkpoints(solver):
    a, _, _ = planted_matrix(MIXED, seed=10)
    op = MatrixOperator(a.cuda())
    vals, _ = exact_top(a, 6, "SA")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = SOLVERS[solver](op, 6, which="SA", tol=1e-8, to_numpy=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert result.eigenvectors.device.type == "cuda"
    assert np.allclose(result.eigenvalues.cpu().numpy(), vals, rtol=1e-6)
    assert result.num_products >= 100
    assert len(syncs) <= 3 * result.info["checks"] + 5
