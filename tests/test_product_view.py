"""The product view every solver works through: NaN/Inf checks that name the product, exact
power-of-two scaling against overflow, and progress bars that count products."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hessian_eigenthings import (
    LambdaOperator,
    MatrixOperator,
    NonFiniteError,
    block_lanczos,
    deflated_power_iteration,
    lanczos,
    power_iteration,
    thick_restart_lanczos,
)
from hessian_eigenthings.solvers.product_view import ProductView
from helpers import exact_top, planted_matrix

SPECTRUM = [10.0, -8.0, 7.0, 5.5, -4.0] + list(np.linspace(-2.0, 2.0, 55))
N = len(SPECTRUM)

SOLVERS = {
    "power_iteration": lambda op, **kw: power_iteration(op, **kw),
    "deflated_power_iteration": lambda op, **kw: deflated_power_iteration(op, 3, **kw),
    "lanczos": lambda op, **kw: lanczos(op, 3, **kw),
    "thick_restart_lanczos": lambda op, **kw: thick_restart_lanczos(op, 3, **kw),
    "block_lanczos": lambda op, **kw: block_lanczos(op, 3, **kw),
}


def poisoned(a: torch.Tensor, from_product: int, value: float = float("nan")) -> LambdaOperator:
    """``a`` as an operator whose products return ``value`` in one entry from product ``from_product`` on."""
    count = [0]

    def product(v):
        count[0] += 1
        out = a @ v
        if count[0] >= from_product:
            out[3] = value
        return out

    return LambdaOperator(product, a.shape[0], dtype=a.dtype, device=a.device)


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("from_product,value", [(1, float("nan")), (7, float("inf"))])
def test_a_non_finite_product_raises_naming_the_solver_and_product_and_fortran_prints_nothing(
        capfd, solver, from_product, value):
    a, _, _ = planted_matrix(SPECTRUM, seed=1)
    op = poisoned(a, from_product, value)
    capfd.readouterr()
    # a block product is named by its range: "products 7-9 (one block)"
    named = rf"{solver}: operator products? {from_product}(-\d+ \(one block\))? of this solve returned NaN or Inf"
    with pytest.raises(NonFiniteError, match=named):
        SOLVERS[solver](op, verbose=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # e.g. no "DLASCL parameter number 4 had an illegal value"


def test_deferred_checks_name_the_product_only_at_the_flush():
    a, _, _ = planted_matrix(SPECTRUM, seed=2)
    view = ProductView(poisoned(a, 3), "my_solver", verbose=False)
    v = torch.ones(N, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match=r"my_solver: operator products 3-4 \(one block\)"):
        with view.deferred_checks():
            view.apply(v)
            view.apply(v)
            view.apply_block(torch.ones(N, 2, dtype=torch.float64))  # products 3 and 4
            view.apply(v)
            assert view.num_products == 5  # nothing raised yet: no host read per product
    immediate = ProductView(poisoned(a, 2), "other", verbose=False)
    immediate.apply(v)
    with pytest.raises(NonFiniteError, match="other: operator product 2 "):
        immediate.apply(v)


def test_scale_is_a_power_of_two_fixed_at_the_first_nonzero_product():
    a, _, _ = planted_matrix(SPECTRUM, seed=3)
    calls = [0]

    def product(v):
        calls[0] += 1
        return torch.zeros_like(v) if calls[0] == 1 else 1e20 * (a @ v)

    a = a.to(torch.float32)  # 1e20 is beyond 2**32, the size float32 products keep unscaled
    for deferred in (False, True):
        calls[0] = 0
        view = ProductView(LambdaOperator(product, N, dtype=torch.float32), "s", verbose=False)
        v = torch.ones(N, dtype=torch.float32)
        with view.deferred_checks() if deferred else _nothing():
            zero = view.apply(v)
            first = view.apply(v)
            second = view.apply(2 * v)
            view.flush_checks()
        scale = view.scale
        mantissa, exponent = np.frexp(scale)
        assert mantissa == 0.5 and torch.all(zero == 0)
        assert 0.5 <= float(first.abs().max()) < 1  # the first nonzero product sets it
        assert torch.equal(first / scale, 1e20 * (a @ v))  # exact: no rounding from the scaling
        assert torch.equal(second, first * 2)
    # products of ordinary size (here 1e20 in float64, within 2**+-256) are not scaled, nor copied
    matrix = MatrixOperator(1e20 * a.double())
    view = ProductView(matrix, "s", verbose=False)
    ones = torch.ones(N, dtype=torch.float64)
    assert torch.equal(view.apply(ones), matrix.matrix @ ones)
    assert view.scale == 1.0


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("factor", [1e20, 1e-20])
def test_float32_operators_of_extreme_scale_give_the_right_eigenvalues(solver, factor):
    """Entries around 1e20 square to 1e40, beyond float32; around 1e-20 their squares underflow."""
    a64, _, _ = planted_matrix(SPECTRUM, seed=4)
    a = (a64 * factor).to(torch.float32)
    assert torch.isfinite(a).all()
    if factor > 1:
        assert torch.isinf((a * a).sum())  # float32 squares overflow
    else:
        assert float((a * a).min()) == 0  # and underflow
    expected = exact_top(a.double(), 3)[0]
    result = SOLVERS[solver](MatrixOperator(a), verbose=False, to_numpy=True)
    k = 1 if solver == "power_iteration" else 3
    values = np.atleast_1d(np.asarray(result.eigenvalues, dtype=np.float64))
    assert result.converged.all()
    assert np.allclose(values, expected[:k], rtol=1e-4, atol=0)
    assert np.all(np.isfinite(result.residuals)) and np.all(result.residuals <= 1e-3 * np.abs(values))


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_the_progress_bar_counts_products_and_ends_at_their_true_total(capsys, solver):
    a, _, _ = planted_matrix(SPECTRUM, seed=5)
    result = SOLVERS[solver](MatrixOperator(a), verbose=True)
    err = capsys.readouterr().err
    counts = re.findall(r"(\d+)/(\d+) \[", err)  # tqdm's "15/15 [00:00<...]"
    assert counts, err
    done, total = map(int, counts[-1])
    assert done == total == result.num_products
    if solver == "power_iteration":
        assert result.num_products < 1000  # not the cap: it stopped on the residual


def test_a_silent_bar_prints_nothing(capsys):
    a, _, _ = planted_matrix(SPECTRUM, seed=5)
    for solve in SOLVERS.values():
        solve(MatrixOperator(a), verbose=False)
    assert capsys.readouterr().err == ""


def test_view_passes_the_operator_through():
    a, _, _ = planted_matrix(SPECTRUM, seed=6)
    op = MatrixOperator(a)
    view = ProductView(op, "s", verbose=False)
    assert (view.size, view.dtype, view.device, view.is_stochastic) == (op.size, op.dtype, op.device, False)
    entered = []

    class Tracking(MatrixOperator):
        def frozen(self):
            entered.append(True)
            return super().frozen()

    with ProductView(Tracking(a), "s", verbose=False).frozen():
        pass
    assert entered == [True]
    out = view.apply(torch.ones(N, dtype=torch.float64))
    out.mul_(0)  # a product of the view is the solver's own: changing it leaves the operator alone
    assert torch.equal(op.matrix, a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("solver", ["thick_restart_lanczos", "block_lanczos"])
def test_cuda_checks_and_scaling_wait_for_the_checkpoints(solver):
    import warnings

    a64, _, _ = planted_matrix(SPECTRUM, seed=7)
    a = (a64 * 1e20).to(torch.float32).cuda()
    expected = exact_top(a64 * 1e20, 3)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = SOLVERS[solver](MatrixOperator(a), verbose=False, to_numpy=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert result.converged.all() and np.allclose(result.eigenvalues.cpu().numpy(), expected, rtol=1e-4)
    assert len(syncs) <= 4 * result.info["checks"] + 8, len(syncs)
    # the 7th product (in a block of 3: products 7-9) turns NaN; it is named at the next checkpoint
    with pytest.raises(NonFiniteError, match=rf"{solver}: operator products? 7"):
        SOLVERS[solver](poisoned(a, 7), verbose=False)
