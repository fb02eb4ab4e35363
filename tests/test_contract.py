"""The contract every eigensolver keeps: the same keywords and aliases, the same argument checks,
the same result types, refusal of stochastic operators by Krylov solvers, and zero operators."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hessian_eigenthings.solvers.contract as contract_module
from hessian_eigenthings import (
    ConvergenceWarning,
    HVPOperator,
    LambdaOperator,
    MatrixOperator,
    block_lanczos,
    compute_hessian_eigenthings,
    deflated_power_iteration,
    lanczos,
    power_iteration,
    thick_restart_lanczos,
)
from hessian_eigenthings.solvers.verify import Completion
from helpers import abs_cosines, classification_data, exact_top, mini_batch_like, planted_matrix, small_mlp

F = nn.functional
# Indefinite with well separated ends: every solver converges on it within a few hundred products.
SPECTRUM = [10.0, -8.0, 7.0, 5.5, -4.0] + list(np.linspace(-2.0, 2.0, 55))
N = len(SPECTRUM)

# Every solver, called with k = 2 (power_iteration finds 1) and the keywords given.
SOLVERS = {
    "power_iteration": lambda op, **kw: power_iteration(op, **kw),
    "deflated_power_iteration": lambda op, **kw: deflated_power_iteration(op, 2, **kw),
    "lanczos": lambda op, **kw: lanczos(op, 2, **kw),
    "thick_restart_lanczos": lambda op, **kw: thick_restart_lanczos(op, 2, **kw),
    "block_lanczos": lambda op, **kw: block_lanczos(op, 2, **kw),
}
KRYLOV = ("lanczos", "thick_restart_lanczos", "block_lanczos")


def planted(dtype=torch.float64, scale=1.0, seed=1):
    a, _, _ = planted_matrix(SPECTRUM, seed=seed)
    return (a * scale).to(dtype)


def top(k_values, result):
    """The eigenvalues of a result as a float64 array (power_iteration gives a float)."""
    return np.atleast_1d(np.asarray(result.eigenvalues, dtype=np.float64))[:k_values]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_every_solver_takes_the_core_keywords(solver):
    a = planted()
    _, vecs = exact_top(a, 2, "LA")
    result = SOLVERS[solver](
        MatrixOperator(a), which="LA", tol=1e-8, max_steps=2000, init_vecs=torch.from_numpy(vecs), seed=3,
        verbose=False, to_numpy=True, use_gpu=False, max_basis_bytes=10**9, check_multiplicity=True,
    )
    k = 1 if solver == "power_iteration" else 2
    assert np.allclose(top(k, result), [10.0, 7.0][:k], rtol=1e-9)
    assert result.converged.all() and result.which == "LA" and result.tol == 1e-8
    assert isinstance(result.eigenvectors, np.ndarray)


@pytest.mark.parametrize("call,alias,new,value", [
    (lambda a, **kw: power_iteration(a, **kw), "steps", "max_steps", 400),
    (lambda a, **kw: power_iteration(a, **kw), "error_threshold", "tol", 1e-7),
    (lambda a, **kw: power_iteration(a, **kw), "init_vec", "init_vecs", "vector"),
    (lambda a, **kw: deflated_power_iteration(a, 2, **kw), "power_iter_steps", "max_steps", 400),
    (lambda a, **kw: deflated_power_iteration(a, 2, **kw), "power_iter_err_threshold", "tol", 1e-7),
    (lambda a, **kw: deflated_power_iteration(a, 2, **kw), "init_vec", "init_vecs", "vector"),
    (lambda a, **kw: lanczos(a, 2, **kw), "init_vec", "init_vecs", "vector"),
    (lambda a, **kw: thick_restart_lanczos(a, 2, **kw), "init_vec", "init_vecs", "vector"),
    (lambda a, **kw: block_lanczos(a, 2, **kw), "init_vec", "init_vecs", "vector"),
])
def test_historical_names_are_aliases_and_both_at_once_is_an_error(call, alias, new, value):
    a = planted()
    if value == "vector":
        value = torch.from_numpy(exact_top(a, 1)[1][0]) + 1e-3
    by_alias = call(a, verbose=False, **{alias: value})
    by_name = call(a, verbose=False, **{new: value})
    assert np.array_equal(top(2, by_alias), top(2, by_name))
    assert by_alias.num_products == by_name.num_products
    with pytest.raises(TypeError, match=f"both {alias}= and {new}="):
        call(a, verbose=False, **{alias: value, new: value})


def test_positional_orders_of_the_classic_signatures_still_work():
    a = planted()
    value, vector = power_iteration(a, 500, 1e-8, 0.0, False, False, None, verbose=False)
    assert abs(value - 10.0) < 1e-7 and vector.shape == (N,)
    vals, vecs = deflated_power_iteration(a, 2, 800, 1e-8, 0.0, False, False, True, verbose=False)
    assert np.allclose(vals, [10.0, -8.0], rtol=1e-7) and vecs.shape == (2, N)
    vals, _ = lanczos(a, 2, "LA", 20, 1e-8, 30, None, False, False, verbose=False)
    assert np.allclose(vals, [10.0, 7.0], rtol=1e-9)
    vals, _ = thick_restart_lanczos(a, 2, "SA", 100, 1e-8, 30, None, True, False, True, verbose=False)
    assert np.allclose(vals, [-8.0, -4.0], rtol=1e-9)
    vals, _ = block_lanczos(a, 2, "LM", 2, 100, 1e-8, 30, None, True, False, True, verbose=False)
    assert np.allclose(vals, [10.0, -8.0], rtol=1e-9)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -1e-3])
def test_tolerance_that_is_not_finite_and_positive_is_refused(solver, bad):
    op = LambdaOperator(lambda v: v * 2, N, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be a positive number"):
        SOLVERS[solver](op, tol=bad, verbose=False)
    with pytest.raises(TypeError, match="must be a positive number"):
        SOLVERS[solver](op, tol="1e-6", verbose=False)
    assert op.num_products == 0  # refused before any product


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_bad_seed_and_booleans_are_refused_before_any_product(solver):
    op = LambdaOperator(lambda v: v * 2, N, dtype=torch.float64)
    with pytest.raises(TypeError, match="seed must be an integer"):
        SOLVERS[solver](op, seed="abc", verbose=False)
    with pytest.raises(TypeError, match="seed must be an integer"):
        SOLVERS[solver](op, seed=1.5, verbose=False)
    with pytest.raises(TypeError, match="verbose must be True or False"):
        SOLVERS[solver](op, verbose="False")
    with pytest.raises(TypeError, match="to_numpy must be True or False"):
        SOLVERS[solver](op, to_numpy="yes", verbose=False)
    with pytest.raises(TypeError, match="check_multiplicity must be True or False"):
        SOLVERS[solver](op, check_multiplicity=1, verbose=False)
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        SOLVERS[solver](op, max_steps=0, verbose=False)
    assert op.num_products == 0


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_seed_none_leaves_the_global_random_state_alone(solver):
    a = planted()
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    SOLVERS[solver](a, seed=None, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert np.array_equal(np.random.get_state()[1], np_state)


@pytest.mark.parametrize("solver", KRYLOV)
def test_krylov_solvers_refuse_a_stochastic_operator(solver):
    op = mini_batch_like(planted(), 0.5, seed=0)
    with pytest.raises(ValueError, match=r"stochastic.*power iteration \(mode=\"power_iter\""):
        SOLVERS[solver](op, verbose=False)
    assert op.num_products == 0


def test_power_iteration_keeps_working_on_a_stochastic_operator():
    op = mini_batch_like(planted(), 1e-3, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = deflated_power_iteration(op, 2, verbose=False)
    assert np.allclose(result.eigenvalues, [10.0, -8.0], rtol=1e-2)


@pytest.mark.parametrize("mode", ["auto", "thick_restart", "block_lanczos", "lanczos"])
def test_one_call_krylov_modes_refuse_a_mini_batch_operator(mlp_problem, mode):
    model, loader, _, _, _ = mlp_problem
    with pytest.raises(ValueError, match="stochastic"):
        compute_hessian_eigenthings(model, loader, F.cross_entropy, 2, full_dataset=False, mode=mode,
                                    use_gpu=False, verbose=False)
    with pytest.warns(ConvergenceWarning, match="stochastic"):
        result = compute_hessian_eigenthings(model, loader, F.cross_entropy, 1, full_dataset=False, mode="power_iter",
                                             use_gpu=False, verbose=False, max_steps=5)
    assert result.num_products >= 1


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = small_mlp()
        self.unused = nn.Linear(3, 3).double()

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_an_exactly_zero_operator_gives_converged_zeros(solver):
    model = _WithUnused()
    x, y = classification_data(num=64)
    hessian_of_unused = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, params=["unused"])
    zero = LambdaOperator(lambda v: torch.zeros_like(v), N, dtype=torch.float64)
    for op in (hessian_of_unused, zero):
        result = SOLVERS[solver](op, verbose=False, to_numpy=True)
        values = top(2, result)
        vectors = np.atleast_2d(result.eigenvectors)
        assert np.all(values == 0) and result.converged.all() and np.all(result.residuals == 0)
        assert np.allclose(vectors @ vectors.T, np.eye(len(vectors)), atol=1e-12)


def test_arpack_started_in_the_null_space_of_a_nonzero_operator_is_not_taken_for_zero():
    diag = torch.zeros(N, dtype=torch.float64)
    diag[:5] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    op = LambdaOperator(lambda v: diag * v, N, dtype=torch.float64)
    start = torch.zeros(N, dtype=torch.float64)
    start[10] = 1.0  # A start = 0: every Krylov vector is zero
    with pytest.warns(ConvergenceWarning, match="null space"):
        result = lanczos(op, 2, init_vecs=start, verbose=False)
    assert not result.converged.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_result_types_are_the_same_for_every_solver(solver, dtype):
    a = planted(dtype)
    expected = exact_top(a.double(), 2)[0]
    numpy_result = SOLVERS[solver](MatrixOperator(a), verbose=False, to_numpy=True)
    tensor_result = SOLVERS[solver](MatrixOperator(a), verbose=False, to_numpy=False)
    if solver == "power_iteration":
        assert isinstance(numpy_result.eigenvalues, float) and isinstance(tensor_result.eigenvalues, float)
        assert numpy_result.eigenvectors.shape == (N,) and tensor_result.eigenvectors.shape == (N,)
    else:
        assert numpy_result.eigenvalues.dtype == np.float64 and numpy_result.eigenvalues.shape == (2,)
        assert isinstance(tensor_result.eigenvalues, torch.Tensor) and tensor_result.eigenvalues.dtype == torch.float64
        assert numpy_result.eigenvectors.shape == (2, N)
    assert isinstance(numpy_result.eigenvectors, np.ndarray)
    assert numpy_result.eigenvectors.dtype == {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    assert isinstance(tensor_result.eigenvectors, torch.Tensor) and tensor_result.eigenvectors.dtype == dtype
    for result in (numpy_result, tensor_result):
        assert result.residuals.dtype == np.float64 and result.converged.dtype == bool
        k = 1 if solver == "power_iteration" else 2
        got = np.atleast_1d(np.asarray(result.eigenvalues if not isinstance(result.eigenvalues, torch.Tensor)
                                       else result.eigenvalues.numpy(), dtype=np.float64))
        # eigenvalue errors are about residual**2 / gap: 1e-8 relative at power iteration's default tol 1e-4
        assert np.allclose(got, expected[:k], rtol=1e-5 if dtype == torch.float32 else 1e-7)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_the_repeated_eigenvalue_check_runs_when_every_pair_converged(monkeypatch, solver):
    """The shared finish hands converged pairs to the check and takes back what it corrects."""
    a = planted()
    calls = []

    def check(op, values, vectors, which, tol, seed):
        calls.append((values.clone(), vectors.clone(), which, tol, seed))
        # pretend the check found a copy the solver missed: it returns other pairs, ordered as asked
        vals, vecs = exact_top(a, len(values), which)
        # it works in the units of the products it is given (scaled by a power of two)
        return Completion(torch.tensor(vals) * op.scale, torch.from_numpy(vecs.T.copy()), torch.zeros(len(values),
                          dtype=torch.float64), 3, 1)

    monkeypatch.setattr(contract_module, "complete_multiplicities", check)
    k = 1 if solver == "power_iteration" else 2
    # with k = 1 the check runs for a given start vector only (a random one reaches the top pair)
    start = {"init_vec": torch.ones(N, dtype=torch.float64)} if k == 1 else {}
    result = SOLVERS[solver](a, which="SA", seed=5, verbose=False, tol=1e-8, **start)
    assert len(calls) == 1
    values, vectors, which, tol, seed = calls[0]
    assert values.shape == (k,) and vectors.shape == (N, k) and which == "SA" and tol == 1e-8 and seed == 5
    assert np.allclose(vectors.T @ vectors, np.eye(k), atol=1e-10)
    assert np.allclose(top(k, result), [-8.0, -4.0][:k], rtol=1e-9)
    assert result.info["multiplicity_check"] == {"products": 3, "missed": 1, "miss_probability": 0.0}
    calls.clear()
    SOLVERS[solver](a, which="SA", verbose=False, check_multiplicity=False, **start)
    assert calls == []  # turned off
    if k == 1:
        SOLVERS[solver](a, which="SA", verbose=False, tol=1e-8)
        assert calls == []  # k = 1 from a random start: the answer cannot change
    if solver != "lanczos":  # ARPACK raises instead of returning unconverged pairs
        short = {"num_lanczos_vectors": 6} if solver in KRYLOV else {}
        with pytest.warns(ConvergenceWarning):
            SOLVERS[solver](a, which="SA", verbose=False, max_steps=1, tol=1e-12, **short)
        assert calls == []  # not every pair converged


def test_warm_start_rows_for_arpack_are_summed_into_one_start_vector(monkeypatch):
    import hessian_eigenthings.solvers.arpack as arpack_module

    a = planted()
    vals, vecs = exact_top(a, 3, "LA")
    seen = {}
    real_eigsh = arpack_module.eigsh

    def spy(*args, **kwargs):
        seen["v0"] = kwargs["v0"]
        return real_eigsh(*args, **kwargs)

    monkeypatch.setattr(arpack_module, "eigsh", spy)
    rows = torch.from_numpy(vecs) * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
    result = lanczos(a, 3, which="LA", init_vecs=rows, verbose=False)
    assert np.allclose(seen["v0"], vecs.sum(axis=0), atol=1e-15)  # the sum of the normalised rows
    assert np.allclose(result.eigenvalues, vals, rtol=1e-10)
    assert np.all(abs_cosines(result.eigenvectors, vecs) >= 1 - 1e-10)


# -- the same answer on every rank -------------------------------------------------------------
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_seed_none_is_drawn_once_through_the_broadcast_and_decides_every_random_choice(monkeypatch, solver):
    """Under torch.distributed, rank 0's fresh seed reaches every rank by one broadcast. Here the
    broadcast hands every call the same "rank 0" value: two solves with seed=None then agree bit for
    bit (as the ranks do), including the native solvers' breakdown noise."""
    import hessian_eigenthings.utils as utils_module

    sent = []

    def rank0_broadcast(tensor, src=0, group=None):
        sent.append(tensor.clone())
        tensor.fill_(123456789)
        return tensor

    monkeypatch.setattr(utils_module, "broadcast", rank0_broadcast)
    # three repeated eigenvalues: the Krylov space breaks down, and the noise that restarts it matters
    a, _, _ = planted_matrix([5.0, 5.0, 5.0, 3.0, 3.0] + list(np.linspace(-1.0, 1.0, 55)), seed=2)
    first = SOLVERS[solver](a, seed=None, verbose=False, to_numpy=False)
    second = SOLVERS[solver](a, seed=None, verbose=False, to_numpy=False)
    assert len(sent) == 2  # one broadcast per solve
    assert torch.equal(torch.as_tensor(first.eigenvectors), torch.as_tensor(second.eigenvectors))
    assert first.num_products == second.num_products


def _rank_entry(rank: int, folder: str) -> None:
    """One of two gloo ranks: every solver with seed=None on the rank's shard of the data."""
    import datetime
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = small_mlp()
        x, y = classification_data()
        shard = slice(0, 300) if rank == 0 else slice(300, 512)
        op = HVPOperator(model, [(x[shard], y[shard])], F.cross_entropy, use_gpu=False)
        out = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # agreement, not convergence, is checked
            for name, solve in (("thick_restart", thick_restart_lanczos), ("block_lanczos", block_lanczos),
                                ("power_iter", deflated_power_iteration)):
                steps = {"max_steps": 20} if name == "power_iter" else {}
                result = solve(op, 2, which="LA", seed=None, verbose=False, to_numpy=False, **steps)
                out[name] = (result.eigenvalues.cpu(), result.eigenvectors.cpu(), result.num_products)
    except BaseException:  # noqa: BLE001 (reported to the test, which fails on it)
        out = {"crash": traceback.format_exc()}
    torch.save(out, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 10-25 s on a busy 2-core machine
def test_seed_none_gives_bitwise_equal_eigenpairs_on_every_rank(mlp_problem, tmp_path):
    """With seed=None the seed is drawn on rank 0 and shared, so the breakdown noise of the native
    solvers (and every other random choice) is the same on every rank: results agree bit for bit."""
    import torch.multiprocessing as mp

    context = mp.spawn(_rank_entry, args=(str(tmp_path),), nprocs=2, join=False)
    try:
        while not context.join(timeout=120):
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    outs = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for rank, out in enumerate(outs):
        assert "crash" not in out, f"rank {rank} crashed:\n{out['crash']}"
    _, _, _, _, hessian = mlp_problem
    exact = exact_top(hessian, 2, "LA")[0]
    for name in ("thick_restart", "block_lanczos", "power_iter"):
        (vals0, vecs0, products0), (vals1, vecs1, products1) = outs[0][name], outs[1][name]
        assert torch.equal(vals0, vals1) and torch.equal(vecs0, vecs1) and products0 == products1, name
        if name != "power_iter":
            assert np.allclose(vals0.numpy(), exact, rtol=1e-6), name
