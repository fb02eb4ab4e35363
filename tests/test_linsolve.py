"""CG and MINRES against numpy.linalg.solve: planted matrices, dense model Hessians and GGNs."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    ConvergenceWarning,
    GGNOperator,
    HVPOperator,
    LambdaOperator,
    MatrixOperator,
    NotPositiveDefiniteError,
    cg,
    dense_matrix,
    minres,
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
SOLVERS = {"cg": cg, "minres": minres}


def _rhs(n, m, seed=0, dtype=torch.float64):
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _solve(a, b):
    return np.linalg.solve(a.double().numpy(), b.double().numpy())


def _relative_error(x, ref):
    x = x.double().numpy()
    return np.linalg.norm(x - ref, axis=0) / np.linalg.norm(ref, axis=0)


@pytest.fixture(scope="module")
def spd():
    a, _, _ = planted_matrix(list(np.geomspace(0.01, 10.0, 80)), seed=1)
    return a


@pytest.fixture(scope="module")
def indefinite():
    a, _, _ = planted_matrix(list(np.linspace(-4.0, 6.0, 80) + 0.0625), seed=2)
    return a


@pytest.mark.parametrize("name", ["cg", "minres"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spd_block_matches_numpy(spd, name, dtype):
    b = _rhs(80, 3, dtype=dtype)
    result = SOLVERS[name](spd.to(dtype), b, verbose=False)
    ref = _solve(spd, b)
    assert result.converged and result.x.shape == (80, 3) and result.x.dtype == dtype
    # condition number 1e3: the error is at most cond * the relative residual
    rtol = 1e-10 if dtype == torch.float64 else 1e-4  # the defaults
    assert result.info["rtol"] == rtol
    assert _relative_error(result.x, ref).max() < 1e3 * rtol * 1.5
    assert np.all(result.relative_residuals <= rtol)
    assert result.residual_norms.shape == (result.iterations + 1, 3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minres_solves_indefinite_systems(indefinite, dtype):
    b = _rhs(80, 2, seed=3, dtype=dtype)
    result = minres(indefinite.to(dtype), b, verbose=False)
    ref = _solve(indefinite, b)
    assert result.converged
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    assert _relative_error(result.x, ref).max() < tol
    # MINRES minimises the residual over a growing space: its norm never rises
    history = result.residual_norms
    for column in range(2):
        seen = history[:, column][~np.isnan(history[:, column])]
        assert np.all(np.diff(seen) <= 1e-12 * seen[0])


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_damping_solves_the_shifted_system(name):
    # A PSD and singular: A + 0.5 I is positive definite
    a, _, _ = planted_matrix([0.0] * 5 + list(np.linspace(0.1, 3.0, 35)), seed=4)
    b = _rhs(40, 1, seed=5)[:, 0]
    result = SOLVERS[name](a, b, damping=0.5, verbose=False)
    ref = np.linalg.solve(a.numpy() + 0.5 * np.eye(40), b.numpy())
    assert result.converged and result.x.shape == (40,)
    assert np.allclose(result.x.numpy(), ref, rtol=0, atol=1e-9)
    assert result.info["damping"] == 0.5


def test_minres_negative_damping_shifts_the_spectrum(spd):
    b = _rhs(80, 1, seed=6)[:, 0]
    result = minres(spd, b, damping=-1.0, verbose=False)  # A - I is indefinite
    ref = np.linalg.solve(spd.numpy() - np.eye(80), b.numpy())
    assert result.converged
    assert np.allclose(result.x.numpy(), ref, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_block_columns_match_one_at_a_time(name):
    spd, _, _ = planted_matrix(list(np.linspace(1.0, 10.0, 80)), seed=31)
    b = _rhs(80, 4, seed=7)
    b[:, 2] *= 1e-3  # a different scale: its own stopping threshold
    block = SOLVERS[name](MatrixOperator(spd), b, verbose=False)
    for j in range(4):
        single = SOLVERS[name](MatrixOperator(spd), b[:, j], verbose=False)
        # the same recurrence; a block product rounds differently from a single one
        assert abs(int(block.info["column_iterations"][j]) - single.iterations) <= 1
        assert torch.allclose(block.x[:, j], single.x, rtol=0, atol=1e-9 * float(single.x.norm()))
    # one block product per iteration for the running columns, plus one final check per column
    assert block.num_products == int(block.info["column_iterations"].sum()) + 4


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_finished_columns_leave_the_block(name):
    spd, _, q = planted_matrix(list(np.geomspace(0.01, 10.0, 80)), seed=1)
    counts = []
    op = LambdaOperator(lambda v: spd @ v, 80, dtype=torch.float64, apply_block_fn=lambda m: counts.append(m.shape[1]) or spd @ m)
    b = _rhs(80, 2, seed=8)
    b[:, 1] = q[:, 0] + q[:, 1]  # two eigenvectors: a 2-dimensional Krylov space, solved in 2 iterations
    result = SOLVERS[name](op, b, verbose=False)
    assert result.converged
    assert result.info["column_iterations"][1] <= 3 < result.info["column_iterations"][0]
    assert counts.count(2) <= 4 and counts.count(1) >= 10


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_warm_start_saves_iterations(spd, name):
    b = _rhs(80, 1, seed=9)[:, 0]
    ref = torch.from_numpy(_solve(spd, b))
    cold = SOLVERS[name](spd, b, verbose=False)
    warm = SOLVERS[name](spd, b, x0=ref + 1e-4 * _rhs(80, 1, seed=10)[:, 0], verbose=False)
    assert warm.converged and cold.converged
    assert warm.iterations < 0.8 * cold.iterations
    assert np.allclose(warm.x.numpy(), ref.numpy(), rtol=0, atol=1e-7)
    # the warm start's residual costs one product
    assert warm.num_products == warm.iterations + 2
    exact = SOLVERS[name](spd, b, x0=ref, rtol=1e-8, verbose=False)
    assert exact.converged and exact.iterations == 0 and exact.num_products == 1


def _badly_scaled(n=120, seed=11):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 2, n, dtype=torch.float64)
    noise = torch.randn(n, n, generator=gen, dtype=torch.float64) / (4 * n**0.5)
    core = torch.eye(n, dtype=torch.float64) + (noise + noise.T) / 2  # diagonally dominant, SPD
    return scale.sqrt()[:, None] * core * scale.sqrt()[None, :]


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_diagonal_preconditioner_cuts_iterations(name):
    a = _badly_scaled()
    b = _rhs(120, 2, seed=12)
    plain = SOLVERS[name](a, b, verbose=False)
    diag = SOLVERS[name](a, b, preconditioner=a.diagonal(), verbose=False)
    as_callable = SOLVERS[name](a, b, preconditioner=lambda r: r / a.diagonal()[:, None], verbose=False)
    ref = _solve(a, b)
    for result in (plain, diag, as_callable):
        assert result.converged
    assert _relative_error(diag.x, ref).max() < 1e-7
    assert diag.iterations * 5 < plain.iterations
    assert as_callable.iterations == diag.iterations
    assert torch.allclose(as_callable.x, diag.x, rtol=0, atol=1e-10 * float(diag.x.norm()))


def test_cg_refuses_an_indefinite_operator_clearly(indefinite):
    b = _rhs(80, 2, seed=13)
    with pytest.raises(NotPositiveDefiniteError, match="minres") as caught:
        cg(indefinite, b, verbose=False)
    error = caught.value
    direction = error.direction.double()
    rayleigh = float(direction @ indefinite @ direction / (direction @ direction))
    assert rayleigh <= 0 and rayleigh == pytest.approx(error.curvature, rel=1e-8)
    assert "damping" in str(error) and "on_indefinite" in str(error)


def test_cg_on_indefinite_return_gives_the_iterate_and_direction(indefinite):
    b = _rhs(80, 2, seed=13)
    with pytest.warns(ConvergenceWarning, match="non-positive curvature"):
        result = cg(indefinite, b, on_indefinite="return", verbose=False)
    assert not result.converged and result.info["not_positive_definite"] == [0, 1]
    for column, found in result.info["negative_curvature"].items():
        p = found["direction"]
        assert float(p @ indefinite @ p) <= 0
        assert not result.info["column_converged"][column]
    assert torch.isfinite(result.x).all()


def test_cg_damping_makes_the_indefinite_system_solvable(indefinite):
    b = _rhs(80, 1, seed=14)[:, 0]
    result = cg(indefinite, b, damping=4.5, verbose=False)  # smallest eigenvalue -3.94
    ref = np.linalg.solve(indefinite.numpy() + 4.5 * np.eye(80), b.numpy())
    assert result.converged and np.allclose(result.x.numpy(), ref, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minres_on_a_singular_inconsistent_system_returns_least_squares(dtype):
    lam = list(np.linspace(-3.0, 5.0, 40))
    lam[4] = lam[20] = 0.0
    a, _, _ = planted_matrix(lam, seed=15)
    b = _rhs(40, 2, seed=16)
    with pytest.warns(ConvergenceWarning, match="least-squares"):
        result = minres(a.to(dtype), b.to(dtype), verbose=False)
    assert not result.converged and result.info["singular"] == [0, 1]
    least_squares = np.linalg.lstsq(a.numpy(), b.numpy(), rcond=None)[0]
    best = np.linalg.norm(b.numpy() - a.numpy() @ least_squares, axis=0)
    assert np.allclose(result.final_residual_norms, best, rtol=1e-8 if dtype == torch.float64 else 1e-4)
    assert result.iterations < 120  # it stops, instead of running to max_iters


def test_singular_but_consistent_systems_converge():
    lam = [0.0] * 3 + list(np.linspace(0.5, 5.0, 37))
    a, _, q = planted_matrix(lam, seed=17)
    b = a @ _rhs(40, 1, seed=18)[:, 0]  # in the range of A
    for solver in (cg, minres):
        result = solver(a, b, verbose=False)
        assert result.converged and result.relative_residuals[0] <= 1e-10


def test_singular_psd_system_outside_the_range_is_not_reported_converged():
    a, _, _ = planted_matrix([0.0] * 3 + list(np.linspace(0.5, 5.0, 37)), seed=19)
    b = _rhs(40, 1, seed=20)[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        try:
            result = cg(a, b, verbose=False, max_iters=200)
        except NotPositiveDefiniteError:
            return  # a null direction detected as such is a clear answer too
    assert not result.converged
    assert result.relative_residuals[0] > 1e-3


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_zero_right_hand_side(spd, name):
    zero = SOLVERS[name](spd, torch.zeros(80, dtype=torch.float64), x0=torch.ones(80, dtype=torch.float64), verbose=False)
    assert zero.converged and zero.iterations == 0 and zero.num_products == 0
    assert torch.equal(zero.x, torch.zeros(80, dtype=torch.float64))
    b = _rhs(80, 3, seed=21)
    b[:, 1] = 0
    mixed = SOLVERS[name](spd, b, verbose=False)
    assert mixed.converged and torch.equal(mixed.x[:, 1], torch.zeros(80, dtype=torch.float64))
    assert mixed.info["column_iterations"][1] == 0 and mixed.relative_residuals[1] == 0


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_out_of_iterations_is_not_converged(spd, name):
    b = _rhs(80, 1, seed=22)[:, 0]
    with pytest.warns(ConvergenceWarning, match="max_iters"):
        result = SOLVERS[name](spd, b, max_iters=5, verbose=False)
    assert not result.converged and result.iterations == 5
    true = float((b - spd @ result.x).norm())
    assert result.final_residual_norms[0] == pytest.approx(true, rel=1e-12)


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_converged_always_means_the_true_residual_is_small(name):
    # float32, condition 1e4, a tolerance near what rounding allows: the recurrences' residuals
    # drift from the true ones, and only some columns can converge
    seen = set()
    for seed in range(4):
        a, _, _ = planted_matrix(list(np.geomspace(1e-2, 1e2, 60)), seed=30 + seed, dtype=torch.float32)
        b = _rhs(60, 3, seed=40 + seed, dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = SOLVERS[name](a, b, rtol=1e-4, verbose=False)
        x = result.x.double()
        true = torch.linalg.vector_norm(b.double() - a.double() @ x, dim=0).numpy()
        # the solver evaluates b - A x in float32, which is itself off by about eps ||A|| ||x||
        rounding = 60**0.5 * 1.2e-7 * 100 * torch.linalg.vector_norm(x, dim=0).numpy()
        assert np.all(np.abs(result.final_residual_norms - true) <= rounding)
        ok = result.info["column_converged"]
        limit = 1e-4 * torch.linalg.vector_norm(b.double(), dim=0).numpy()
        assert np.all(true[ok] <= limit[ok] + rounding[ok])
        seen.update(ok.tolist())
    assert seen == {True, False}


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_checking_every_few_iterations_gives_the_same_solution(spd, name):
    b = _rhs(80, 3, seed=23)
    every = SOLVERS[name](spd, b, verbose=False)
    sparse = SOLVERS[name](spd, b, check_every=8, verbose=False)
    assert sparse.converged and sparse.info["checks"] * 8 >= sparse.iterations
    assert sparse.info["checks"] < every.info["checks"] / 4
    assert np.all(sparse.info["column_iterations"] == every.info["column_iterations"])
    assert torch.allclose(sparse.x, every.x, rtol=0, atol=1e-12 * float(every.x.norm()))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = classification_data(num=60, din=5, classes=3, seed=1)
    return model, x, y, batches(x, y, [40, 20])


def test_minres_with_a_model_hessian(tiny_model):
    model, x, y, loader = tiny_model
    before = model_snapshot(model)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert eigenvalues.min() < 0 < eigenvalues.max()  # indefinite
    b = _rhs(op.size, 2, seed=24)
    result = minres(op, b, damping=0.1, verbose=False)
    ref = np.linalg.solve(hessian.numpy() + 0.1 * np.eye(op.size), b.numpy())
    assert result.converged
    assert _relative_error(result.x, ref).max() < 1e-6
    assert_model_unchanged(model, before)


def test_cg_with_a_model_ggn_and_damping(tiny_model):
    model, x, y, loader = tiny_model
    op = GGNOperator(model, loader, F.cross_entropy, use_gpu=False)
    ggn = dense_matrix(op, verbose=False)
    b = _rhs(op.size, 3, seed=25)
    result = cg(op, b, damping=1e-2, verbose=False)
    ref = np.linalg.solve(ggn.numpy() + 1e-2 * np.eye(op.size), b.numpy())
    assert result.converged
    assert _relative_error(result.x, ref).max() < 1e-7


def test_float32_model_solve_meets_its_default_tolerance(tiny_model):
    model, x, y, loader = tiny_model
    model32 = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    op = GGNOperator(model32, [(x.float(), y)], F.cross_entropy, use_gpu=False)
    b = torch.randn(op.size, generator=torch.Generator().manual_seed(26))
    result = cg(op, b, damping=1e-1, verbose=False)
    assert result.converged and result.info["rtol"] == 1e-4
    assert result.relative_residuals[0] <= 1e-4


@pytest.mark.parametrize("call, error, match", [
    (lambda a: cg(a, torch.ones(7)), ValueError, "shape"),
    (lambda a: cg(a, torch.ones(10, 2), x0=torch.ones(10)), ValueError, "x0"),
    (lambda a: cg(a, "b"), TypeError, "torch.Tensor"),
    (lambda a: cg(a, torch.ones(10), rtol=0, atol=0), ValueError, "not both 0"),
    (lambda a: cg(a, torch.ones(10), rtol=-1), ValueError, "rtol"),
    (lambda a: cg(a, torch.ones(10), max_iters=0), ValueError, "max_iters"),
    (lambda a: cg(a, torch.ones(10), damping=float("nan")), ValueError, "damping"),
    (lambda a: cg(a, torch.ones(10), on_indefinite="ignore"), ValueError, "on_indefinite"),
    (lambda a: cg(a, torch.ones(10), preconditioner=-torch.ones(10)), ValueError, "d.abs"),
    (lambda a: cg(a, torch.ones(10), preconditioner=torch.ones(3)), ValueError, "diagonal of M"),
    (lambda a: cg(a, torch.ones(10), preconditioner=lambda r: r[:, 0]), ValueError, "block"),
    (lambda a: minres(a, torch.full((10,), float("nan"))), ValueError, "NaN"),
    (lambda a: minres(a, torch.ones(10), preconditioner=lambda r: -r), ValueError, "positive definite"),
    (lambda a: cg(a, torch.ones(10), preconditioner=lambda r: -r), ValueError, "positive definite"),
    (lambda a: minres(mini_batch_like(a, 0.1, 0), torch.ones(10)), ValueError, "stochastic"),
])
def test_bad_arguments(call, error, match):
    a, _, _ = planted_matrix(list(range(1, 11)), seed=27)
    with pytest.raises(error, match=match):
        call(a.float() if "mini_batch" not in repr(call) else a)


def test_numpy_input_and_nan_products():
    a, _, _ = planted_matrix(list(range(1, 11)), seed=28)
    result = cg(a.numpy(), np.ones(10), verbose=False)
    assert result.converged and isinstance(result.x, torch.Tensor)
    broken = LambdaOperator(lambda v: v * float("nan"), 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        minres(broken, torch.ones(10, dtype=torch.float64), verbose=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cg", "minres"])
def test_cuda_solves_stay_on_device_and_sync_only_at_checks(name):
    a = _badly_scaled().cuda()
    b = _rhs(120, 3, seed=29).cuda()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = SOLVERS[name](MatrixOperator(a), b, preconditioner=a.diagonal(), verbose=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert result.x.device.type == "cuda" and result.converged
    assert result.info["checks"] * 8 >= result.iterations
    assert len(syncs) <= 12 * result.info["checks"] + 20
    ref = _solve(a.cpu(), b.cpu())
    assert _relative_error(result.x.cpu(), ref).max() < 1e-7


@pytest.mark.parametrize("name", ["cg", "minres"])
def test_solves_run_inside_frozen(spd, name):
    class Watched(MatrixOperator):
        inside = 0

        def frozen(self):
            import contextlib

            @contextlib.contextmanager
            def block():
                Watched.inside += 1
                try:
                    yield
                finally:
                    Watched.inside -= 1
            return block()

        def _matmat(self, mat):
            assert Watched.inside == 1, "a product outside frozen()"
            return super()._matmat(mat)

    result = SOLVERS[name](Watched(spd), _rhs(80, 2, seed=30), verbose=False)
    assert result.converged and Watched.inside == 0
