"""Operator algebra (operators/algebra.py) against dense matrices: linear combinations and shifts,
deflation by a projector, principal submatrices; through solvers and estimators; pass-through of
frozen() / deferred checks; and clear errors for what cannot be combined."""

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    HVPOperator,
    LambdaOperator,
    LinearCombination,
    MatrixOperator,
    ProjectedOperator,
    SubmatrixOperator,
    deflate,
    exact_diagonal,
    hutchinson_trace,
    lanczos,
    submatrix,
    thick_restart_lanczos,
    xtrace,
)
from hessian_eigenthings.operators.base import Operator
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
N = 30


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def pair():
    a, _, _ = planted_matrix(list(np.linspace(-2.0, 5.0, N)), seed=1)
    b, _, _ = planted_matrix(list(np.linspace(0.5, 3.0, N)), seed=2)
    return a, b


EYE = torch.eye(N, dtype=torch.float64)
# (name, build from two operators, the same from the two dense matrices)
COMBINATIONS = [
    ("a*A", lambda A, B: 2.5 * A, lambda a, b: 2.5 * a),
    ("A*a", lambda A, B: A * -1.5, lambda a, b: -1.5 * a),
    ("A/a", lambda A, B: A / 4, lambda a, b: a / 4),
    ("-A", lambda A, B: -A, lambda a, b: -a),
    ("A+B", lambda A, B: A + B, lambda a, b: a + b),
    ("A-B", lambda A, B: A - B, lambda a, b: a - b),
    ("A+c", lambda A, B: A + 0.75, lambda a, b: a + 0.75 * EYE),
    ("c+A", lambda A, B: 0.75 + A, lambda a, b: a + 0.75 * EYE),
    ("A-c", lambda A, B: A - 2, lambda a, b: a - 2 * EYE),
    ("c-A", lambda A, B: 2 - A, lambda a, b: 2 * EYE - a),
    ("nested", lambda A, B: -(2 * A - B / 3 + 0.5) * 0.5 + A, lambda a, b: -(2 * a - b / 3 + 0.5 * EYE) * 0.5 + a),
    ("numpy scalar", lambda A, B: np.float64(3.0) * A - np.int64(2), lambda a, b: 3 * a - 2 * EYE),
    ("0-d tensor", lambda A, B: torch.tensor(3.0) * A, lambda a, b: 3 * a),
    ("sum()", lambda A, B: sum([A, B, A]), lambda a, b: 2 * a + b),
]


@pytest.mark.parametrize("name, build, dense", COMBINATIONS, ids=[c[0] for c in COMBINATIONS])
def test_every_combination_matches_the_dense_matrix(pair, name, build, dense):
    a, b = pair
    A, B = MatrixOperator(a), MatrixOperator(b)
    op = build(A, B)
    expected = dense(a, b)
    assert isinstance(op, LinearCombination) and op.size == N and op.dtype == torch.float64
    v, block = rand(N, seed=3), rand(N, 4, seed=4)
    torch.testing.assert_close(op.apply(v), expected @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op @ block, expected @ block, rtol=1e-12, atol=1e-12)
    assert op.num_products == 5


def test_a_repeated_operator_is_applied_once_and_nesting_is_flattened(pair):
    a, b = pair
    A, B = MatrixOperator(a), MatrixOperator(b)
    op = (A + B) - 0.5 * (A - 3) + A
    assert [(coef, inner) for coef, inner in op.terms] == [(1.5, A), (1.0, B)]
    assert op.shift == 1.5
    op.apply_block(rand(N, 3))
    assert (A.num_products, B.num_products, op.num_products) == (3, 3, 3)


def test_readable_repr(pair):
    a, b = pair
    A, B = MatrixOperator(a), MatrixOperator(b)
    text = repr(2 * A - B / 4 - 0.5)
    assert text == (
        "2 * MatrixOperator(size=30, dtype=torch.float64, device=cpu) - 0.25 * MatrixOperator(size=30, "
        "dtype=torch.float64, device=cpu) - 0.5 I"
    )
    assert repr(-A).startswith("-MatrixOperator(")
    assert "projecting out 2 vectors" in repr(deflate(A, rand(N, 2)))
    assert "5 of 30 entries by indices" in repr(submatrix(A, [0, 1, 2, 3, 4]))


@pytest.mark.parametrize(
    "action, error, words",
    [
        (lambda A: A * "2", TypeError, "must be a real number"),
        (lambda A: A * True, TypeError, "must be a real number"),
        (lambda A: A * torch.ones(N), TypeError, "op @ v"),
        (lambda A: A * float("nan"), ValueError, "must be finite"),
        (lambda A: A / 0, ZeroDivisionError, "divided by zero"),
        (lambda A: A * A, TypeError, "not symmetric"),
        (lambda A: A + np.ones((N, N)), TypeError, "MatrixOperator(M)"),
        (lambda A: A + 1j, TypeError, "must be a real number"),
        (lambda A: A + MatrixOperator(torch.eye(N + 1, dtype=torch.float64)), ValueError, "size 30 and"),
        (lambda A: A - MatrixOperator(torch.eye(N)), TypeError, "dtypes torch.float64 and torch.float32"),
        (lambda A: A + LambdaOperator(lambda v: v, N, dtype=torch.float64, device="meta"), ValueError,
         "on cpu and meta"),
    ],
)
def test_what_cannot_be_combined_is_refused_clearly(pair, action, error, words):
    A = MatrixOperator(pair[0])
    with pytest.raises(error) as info:
        action(A)
    assert words in str(info.value)
    assert A.num_products == 0


def test_deflation_projects_out_given_vectors(pair):
    a, _ = pair
    v = rand(N, 3, seed=5)  # not orthonormal: orthonormalised
    q, _ = torch.linalg.qr(v)
    p = EYE - q @ q.T
    op = deflate(MatrixOperator(a), v)
    assert isinstance(op, ProjectedOperator)
    block = rand(N, 5, seed=6)
    torch.testing.assert_close(op.apply_block(block), p @ a @ p @ block, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.apply(block[:, 0]), p @ a @ p @ block[:, 0], rtol=1e-12, atol=1e-12)
    # one vector, and vectors spanning only two dimensions (the third is a combination)
    one = deflate(a, v[:, 0])
    p1 = EYE - torch.outer(v[:, 0], v[:, 0]) / v[:, 0].dot(v[:, 0])
    torch.testing.assert_close(one.apply(block[:, 1]), p1 @ a @ p1 @ block[:, 1], rtol=1e-12, atol=1e-12)
    dependent = torch.cat([v[:, :2], v[:, :1] - 2 * v[:, 1:2]], dim=1)
    q2, _ = torch.linalg.qr(v[:, :2])
    p2 = EYE - q2 @ q2.T
    op2 = deflate(a, dependent)
    assert op2.basis.shape == (N, 2)
    torch.testing.assert_close(op2.apply_block(block), p2 @ a @ p2 @ block, rtol=1e-10, atol=1e-10)


def test_deflation_refuses_bad_vectors_clearly(pair):
    a, _ = pair
    with pytest.raises(ValueError, match=r"eigenvecs\.T"):
        deflate(a, rand(3, N))
    with pytest.raises(ValueError, match="shape \\(n, m\\) with n=30"):
        deflate(a, rand(N + 1, 2))
    with pytest.raises(ValueError, match="all zero"):
        deflate(a, torch.zeros(N, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        deflate(a, torch.full((N, 1), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="numpy array"):
        deflate(a, [1.0] * N)


def test_deflation_removes_the_given_eigenvectors_from_a_solve():
    values = np.concatenate([[9.0, 7.0, 5.0], np.linspace(-1.0, 2.0, 57)])
    a, lam, vecs = planted_matrix(list(values), seed=7)
    # deflate by the top two eigenvectors: the next eigenvalues come first
    op = deflate(MatrixOperator(a), vecs[:, :2])
    result = thick_restart_lanczos(op, 2, which="LA", tol=1e-10, verbose=False)
    np.testing.assert_allclose(result.eigenvalues, [5.0, 2.0], rtol=1e-9)
    # the deflated directions have eigenvalue zero
    np.testing.assert_allclose(op.apply_block(vecs[:, :2]).numpy(), 0.0, atol=1e-12)


def test_shifted_spectrum_through_solvers():
    values = np.concatenate([[6.0, 4.5], np.linspace(-1.0, 3.0, 48)])
    a, lam, _ = planted_matrix(list(values), seed=8)
    c = 2.0
    shifted = MatrixOperator(a) - c
    for solver in (thick_restart_lanczos, lanczos):
        vals, _ = solver(shifted, 3, which="LA", tol=1e-10, verbose=False)
        np.testing.assert_allclose(vals, np.sort(values)[::-1][:3] - c, rtol=1e-9)
        vals, _ = solver(shifted, 2, which="SA", tol=1e-10, verbose=False)
        np.testing.assert_allclose(vals, np.sort(values)[:2] - c, rtol=1e-9)
    # c - A reverses the spectrum: its largest eigenvalue is c minus the smallest of A
    vals, _ = thick_restart_lanczos(c - MatrixOperator(a), 1, which="LA", tol=1e-10, verbose=False)
    np.testing.assert_allclose(vals, [c - values.min()], rtol=1e-9)


def test_trace_and_diagonal_of_a_combination_through_estimators(pair):
    a, b = pair
    op = 3 * MatrixOperator(a) - 0.5 * MatrixOperator(b) + 2
    dense = 3 * a - 0.5 * b + 2 * EYE
    # exact: a full XTrace sketch and the exact diagonal
    assert xtrace(op, max_products=2 * N, verbose=False).estimate == pytest.approx(float(dense.trace()), rel=1e-12)
    torch.testing.assert_close(exact_diagonal(op, verbose=False).diagonal, dense.diagonal(), rtol=1e-12, atol=1e-12)
    # stochastic: Hutchinson's estimate is within its error of the truth (a, b fixed seeds)
    r = hutchinson_trace(op, max_products=200, seed=1, verbose=False)
    assert abs(r.estimate - float(dense.trace())) < 3 * r.std_error


def test_submatrix_by_indices(pair):
    a, _ = pair
    for indices in ([4, 0, 17, 29, 8], torch.tensor([4, 0, 17, -1, 8]), np.array([4, 0, 17, 29, 8])):
        op = submatrix(MatrixOperator(a), indices)
        idx = torch.tensor([4, 0, 17, 29, 8])
        assert isinstance(op, SubmatrixOperator) and op.size == 5
        dense = a[idx][:, idx]
        block = rand(5, 3, seed=9)
        torch.testing.assert_close(op.apply_block(block), dense @ block, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.apply(block[:, 0]), dense @ block[:, 0], rtol=1e-12, atol=1e-12)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[2, 3, 11]] = True
    torch.testing.assert_close(submatrix(a, mask).apply(torch.ones(3, dtype=torch.float64)),
                               a[[2, 3, 11]][:, [2, 3, 11]].sum(dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exact_diagonal(submatrix(a, slice(3, 9)), verbose=False).diagonal,
                               a.diagonal()[3:9], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "indices, error, words",
    [
        ([1, 1, 2], ValueError, "distinct"),
        ([0, N], ValueError, "[0, 30)"),
        ([], ValueError, "at least one"),
        ([0.5, 1.0], TypeError, "integers"),
        (torch.ones(N - 1, dtype=torch.bool), ValueError, "length n=30"),
    ],
)
def test_bad_indices_are_refused(pair, indices, error, words):
    with pytest.raises(error) as info:
        submatrix(pair[0], indices)
    assert words in str(info.value)


@pytest.fixture(scope="module")
def model_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = classification_data(num=60, din=4, classes=3, seed=3)
    return model, batches(x, y, [30, 30]), dense_loss_hessian(model, F.cross_entropy, x, y)


def test_submatrix_by_parameter_names_is_the_block_of_those_parameters(model_problem):
    model, loader, hessian = model_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    before = model_snapshot(model)
    sub = submatrix(op, params=["2", "0.bias"])  # "2" selects 2.weight and 2.bias
    assert sub.param_names == ["0.bias", "2.weight", "2.bias"]
    idx = torch.cat([torch.arange(24, 30), torch.arange(30, 51)])  # 0.weight is 24 entries, 0.bias 6
    assert torch.equal(sub.indices, idx) and sub.size == 27
    block = rand(27, 2, seed=10)
    torch.testing.assert_close(sub.apply_block(block), hessian[idx][:, idx] @ block, rtol=1e-10, atol=1e-12)
    assert_model_unchanged(model, before)
    parts = sub.unflatten(torch.arange(27, dtype=torch.float64))
    assert list(parts) == ["0.bias", "2.weight", "2.bias"] and parts["2.weight"].shape == (3, 6)
    assert torch.equal(parts["0.bias"], torch.arange(6, dtype=torch.float64))
    # the same block as an operator built on those parameters only
    direct = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, params=["2"])
    sub2 = submatrix(op, params="2")
    torch.testing.assert_close(sub2.apply_block(block[:21]), direct.apply_block(block[:21]), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="no parameter named 'fc9'.*0.weight, 0.bias, 2.weight, 2.bias"):
        submatrix(op, params=["fc9"])
    with pytest.raises(TypeError, match="model operator"):
        submatrix(MatrixOperator(hessian), params=["2"])
    with pytest.raises(TypeError, match="exactly one"):
        SubmatrixOperator(op)
    with pytest.raises(TypeError, match="chosen by params"):
        submatrix(op, [0, 1]).unflatten(torch.zeros(2, dtype=torch.float64))


class ForwardCounter:
    """Counts the model's forward passes: with kept graphs only the first product runs the model."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls += 1


def test_wrappers_pass_frozen_through_so_model_operators_keep_their_graphs(model_problem):
    model, loader, hessian = model_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    n = op.size
    v, _ = torch.linalg.qr(rand(n, 2, seed=11))
    builds = [
        (lambda: 2 * op - 0.5, 2 * hessian - 0.5 * torch.eye(n, dtype=torch.float64)),
        (lambda: deflate(op, v), (torch.eye(n, dtype=torch.float64) - v @ v.T) @ hessian
         @ (torch.eye(n, dtype=torch.float64) - v @ v.T)),
        (lambda: submatrix(op, params="2") * 3, 3 * hessian[30:][:, 30:]),
    ]
    for build, dense in builds:
        counter = ForwardCounter(model)
        try:
            wrapped = build()
            vals = thick_restart_lanczos(wrapped, 2, which="LA", tol=1e-9, verbose=False).eigenvalues
        finally:
            counter.handle.remove()
        np.testing.assert_allclose(vals, np.sort(np.linalg.eigvalsh(dense.numpy()))[::-1][:2], rtol=1e-7)
        assert counter.calls == len(loader), repr(wrapped)  # one forward pass per batch, then kept graphs


class Recording(Operator):
    """The identity, recording the kept-work and deferred-check calls it receives."""

    def __init__(self, stochastic=False):
        super().__init__(N, torch.float64)
        self.is_stochastic = stochastic
        self.events = []

    def _matvec(self, vec):
        return vec.clone()

    @contextlib.contextmanager
    def frozen(self):
        self.events.append("frozen")
        yield
        self.events.append("thawed")

    @contextlib.contextmanager
    def deferred_checks(self):
        self.events.append("deferred")
        yield
        self.events.append("checked")

    def flush_checks(self):
        self.events.append("flush")


@pytest.mark.parametrize(
    "build",
    [lambda a, b: a + 2 * b - 1, lambda a, b: deflate(a + b, rand(N, 1)), lambda a, b: submatrix(a - b, [1, 2])],
    ids=["combination", "projected", "submatrix"],
)
def test_frozen_and_deferred_checks_reach_every_wrapped_operator(build):
    a, b = Recording(), Recording()
    op = build(a, b)
    with op.frozen():
        with op.deferred_checks():
            op.flush_checks()
    for inner in (a, b):
        assert inner.events == ["frozen", "deferred", "flush", "checked", "thawed"]
    assert not op.is_stochastic


def test_a_wrapper_is_stochastic_when_any_part_is(pair):
    a, _ = pair
    noisy = mini_batch_like(a, 0.5, seed=0)
    assert (MatrixOperator(a) + noisy).is_stochastic
    assert deflate(noisy, rand(N, 1)).is_stochastic and submatrix(2 * noisy, [0, 1]).is_stochastic
    assert not (MatrixOperator(a) * 2).is_stochastic
    with pytest.raises(ValueError, match="deterministic"):
        xtrace(noisy - 1, verbose=False)


@pytest.mark.gpu
def test_algebra_stays_on_the_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a, _, vecs = planted_matrix(list(np.linspace(-1.0, 4.0, 64)), seed=9)
    A = MatrixOperator(a.cuda())
    ops = [2 * A - 1, deflate(A, vecs[:, -2:]), submatrix(A, torch.arange(10)), -(A + A) / 3]
    for op in ops:
        assert op.device.type == "cuda"
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = op.apply_block(torch.ones(op.size, 3, dtype=torch.float64, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.device.type == "cuda"
    vals = thick_restart_lanczos(ops[1], 1, which="LA", tol=1e-9, verbose=False).eigenvalues
    np.testing.assert_allclose(vals, [np.linspace(-1.0, 4.0, 64)[-3]], rtol=1e-8)
