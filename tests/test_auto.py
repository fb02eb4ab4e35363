"""mode="auto": thick-restart or block Lanczos and its width, chosen from the operator's measured costs."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_model_unchanged, exact_top, model_snapshot, planted_matrix

from hessian_eigenthings import HVPOperator, block_lanczos, compute_hessian_eigenthings, thick_restart_lanczos
from hessian_eigenthings.operators.base import MatrixOperator
from hessian_eigenthings.operators.plans import Plan, PlanBook
from hessian_eigenthings.solvers import auto as auto_module
from hessian_eigenthings.solvers.auto import (
    BLOCK_PRODUCT_EXPONENT,
    PROBE_WIDTH,
    SCREEN_AFTER,
    auto_eigensolve,
    block_products,
    single_products,
    span_coefficients,
)
from hessian_eigenthings.solvers.registry import get_solver

KEPT = Plan("double_backward", False, kept=True)
FRESH_BLOCK = Plan("forward_over_reverse", True)
SPECTRUM = [40.0, 30.0, 22.0, 17.0, 13.0, 10.0, 8.0] + list(np.linspace(5.0, 0.1, 113))


class CostedMatrix(MatrixOperator):
    """A planted matrix that reports product costs the way an HVP operator does: after its first
    product the costs given are "measured" (forced into its PlanBook), as if timed."""

    def __init__(self, matrix, single=None, shared=None, block_per_vector=None):
        super().__init__(matrix)
        self.plans = PlanBook()
        self.costs = (single, shared, block_per_vector)
        self.widths = []

    def _matvec(self, vec):
        self._measure(1)
        return super()._matvec(vec)

    def _matmat(self, mat):
        self._measure(mat.shape[1])
        return super()._matmat(mat)

    def _measure(self, width):
        self.widths.append(width)
        single, shared, block = self.costs
        if single is not None:
            self.plans.force(KEPT, 1, single)
        if shared is not None:
            self.plans.force_shared(shared)
        if block is not None and width > 1:
            self.plans.force(FRESH_BLOCK, width, block * width)


def planted(seed=0):
    matrix, _, _ = planted_matrix(SPECTRUM, seed=seed)
    return matrix


def test_the_product_model():
    assert single_products(1) < single_products(10)
    for width in (2, 4, 8, 16):
        assert block_products(5, width) == pytest.approx(single_products(5) * width**BLOCK_PRODUCT_EXPONENT)
    assert 1.3 < 2**BLOCK_PRODUCT_EXPONENT < 1.6 and 4 < 16**BLOCK_PRODUCT_EXPONENT < 5.5


def test_an_operator_without_costs_gets_thick_restart_and_the_same_answer():
    matrix = planted()
    result = auto_eigensolve(MatrixOperator(matrix), 4, tol=1e-8, verbose=False)
    reference = thick_restart_lanczos(MatrixOperator(matrix), 4, tol=1e-8, verbose=False)
    assert result.info["auto"]["solver"] == "thick_restart" and "no product costs" in result.info["auto"]["reason"]
    np.testing.assert_array_equal(result.eigenvalues, reference.eigenvalues)
    assert result.num_products == reference.num_products


def test_cheap_single_products_go_on_with_thick_restart_and_spend_no_product_on_the_choice():
    """The screen (kept product / shared pass below 2.5) settles on thick-restart after its first
    products: the solve is exactly thick-restart's, product for product."""
    matrix = planted()
    op = CostedMatrix(matrix, single=0.5, shared=0.4, block_per_vector=0.45)  # ratio 1.25
    result = auto_eigensolve(op, 3, tol=1e-8, verbose=False, check_multiplicity=False)
    reference = thick_restart_lanczos(MatrixOperator(matrix), 3, tol=1e-8, verbose=False, check_multiplicity=False)
    info = result.info["auto"]
    assert info["solver"] == "thick_restart" and info["probe_products"] == 0
    assert info["decided_after_products"] == SCREEN_AFTER and info["second_pass_ratio"] == pytest.approx(1.25)
    assert result.num_products == reference.num_products
    np.testing.assert_array_equal(result.eigenvalues, reference.eigenvalues)
    assert set(op.widths) == {1}


def test_a_slow_second_pass_is_probed_and_block_lanczos_starts_from_the_probe():
    """Kept product 5x the shared pass and blocks a fraction of it per vector (the H200 ResNet-18 case):
    thick-restart starts, one block of PROBE_WIDTH is timed, block Lanczos takes over and its first
    block product is answered from the probe, not computed again."""
    matrix = planted()
    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=0.5)
    result = auto_eigensolve(op, 3, tol=1e-8, verbose=False, seed=3)
    info = result.info["auto"]
    assert info["solver"] == "block_lanczos" and info["block_size"] in (2, 4, 8, 16)
    assert info["decided_after_products"] == SCREEN_AFTER + 1 and info["probe_products"] == PROBE_WIDTH
    assert info["replayed_products"] == min(info["block_size"], PROBE_WIDTH)
    assert op.widths[: SCREEN_AFTER + 2] == [1] * (SCREEN_AFTER + 1) + [PROBE_WIDTH]
    # every product computed once: the count is what the matrix really did
    assert result.num_products == sum(op.widths) == op.num_products
    vals, vecs = exact_top(matrix, 3)
    np.testing.assert_allclose(result.eigenvalues, vals, rtol=1e-7)
    assert result.converged.all()
    assert np.all(np.abs(np.sum(result.eigenvectors * vecs, axis=1)) > 1 - 1e-6)


def test_thick_restart_goes_on_when_the_probe_shows_blocks_are_not_cheaper():
    matrix = planted()
    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=4.8)
    result = auto_eigensolve(op, 3, tol=1e-8, verbose=False, check_multiplicity=False)
    reference = thick_restart_lanczos(MatrixOperator(matrix), 3, tol=1e-8, verbose=False, check_multiplicity=False)
    info = result.info["auto"]
    assert info["solver"] == "thick_restart" and info["probe_products"] == PROBE_WIDTH
    assert result.num_products == reference.num_products + PROBE_WIDTH  # the probe is all it cost
    np.testing.assert_array_equal(result.eigenvalues, reference.eigenvalues)
    assert "thick_restart" in info["predicted_seconds"] and "block_lanczos b=2" in info["predicted_seconds"]


def test_costs_known_before_the_solve_choose_at_once():
    """A later solve on the same operator (a tracker's next step) reads the costs of the earlier one:
    the choice is made before the first product, and block Lanczos needs no probe."""
    matrix = planted()
    op = CostedMatrix(matrix)
    op.plans.force(KEPT, 1, 5.0)
    op.plans.force_shared(1.0)
    op.plans.force(FRESH_BLOCK, 8, 8 * 0.5)
    result = auto_eigensolve(op, 3, tol=1e-8, verbose=False)
    info = result.info["auto"]
    assert info["solver"] == "block_lanczos" and info["decided_after_products"] == 0
    assert info["probe_products"] == 0 and info["replayed_products"] == 0
    assert op.widths[0] == info["block_size"]
    np.testing.assert_allclose(result.eigenvalues, exact_top(matrix, 3)[0], rtol=1e-7)


@pytest.mark.parametrize("k", [1, 10])
def test_the_h200_tables_choose_blocks_for_resnet_and_thick_restart_for_the_gpt(k):
    """Costs as measured on an H200 (multiples of a gradient; see gpu-measurements): ResNet-18's kept
    product 4.98, its shared pass 0.97, a forward-over-reverse block of 16 1.88 per vector: block
    Lanczos, narrow; the GPT: 2.77, 1.37, 1.49: thick-restart."""
    def chosen(single, shared, block16):
        op = CostedMatrix(planted())
        op.plans.force(KEPT, 1, single)
        op.plans.force_shared(shared)
        op.plans.force(FRESH_BLOCK, 16, 16 * block16)
        result = auto_eigensolve(op, k, tol=1e-6, verbose=False)
        return result.info["auto"]["solver"], result.info["auto"]["block_size"]

    solver, width = chosen(4.98, 0.97, 1.88)
    assert solver == "block_lanczos" and width == 2
    assert chosen(2.77, 1.37, 1.49) == ("thick_restart", 1)
    assert chosen(1.75, 1.28, 1.10) == ("thick_restart", 1)  # the CPU MLP's table


def test_an_hvp_operator_on_the_cpu_gets_thick_restart_with_its_exact_answer(mlp_problem, monkeypatch):
    """The screen read on real products; forced to 'not slow', so that a loaded machine cannot
    turn a millisecond product into a probe, the auto solve is thick-restart's, product for product."""
    monkeypatch.setattr(PlanBook, "second_pass_ratio", lambda self: 1.0)
    model, loader, _, _, hessian = mlp_problem
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    result = compute_hessian_eigenthings(model, loader, F.cross_entropy, 2, use_gpu=False, verbose=False, tol=1e-6)
    reference = thick_restart_lanczos(HVPOperator(model, loader, F.cross_entropy, use_gpu=False), 2, tol=1e-6,
                                      verbose=False)
    assert result.info["auto"]["solver"] == "thick_restart" and result.num_products == reference.num_products
    np.testing.assert_allclose(result.eigenvalues, exact_top(hessian, 2)[0], rtol=1e-6)
    assert_model_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_an_hvp_operator_times_its_screen_on_real_products(mlp_problem):
    model, loader, _, _, _ = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    result = auto_eigensolve(op, 2, tol=1e-6, verbose=False)
    costs = result.info["auto"]["plan_costs"]
    assert costs["kept double-backward x1"]["trials"] == 3 and costs["kept double-backward x1"]["seconds"] > 0
    assert costs["shared forward and first backward"]["seconds"] > 0
    assert result.info["auto"]["second_pass_ratio"] > 0


def test_an_hvp_operator_switches_to_blocks_with_the_fresh_plan_and_keeps_the_model(mlp_problem, caplog):
    """Forced ResNet-like costs on a real model: block Lanczos runs exactly, the model and the random
    state come back as they were, and the choice is logged."""
    model, loader, _, _, hessian = mlp_problem
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    op.plans.force(KEPT, 1, 5.0)
    op.plans.force_shared(1.0)
    op.plans.force(FRESH_BLOCK, 16, 16 * 1.0)
    with caplog.at_level(logging.INFO, logger="hessian_eigenthings"):
        result = auto_eigensolve(op, 2, tol=1e-6, verbose=False)
    assert result.info["auto"]["solver"] == "block_lanczos"
    np.testing.assert_allclose(result.eigenvalues, exact_top(hessian, 2)[0], rtol=1e-6)
    assert any(r.getMessage().startswith("auto: block_lanczos with blocks of") for r in caplog.records)
    assert_model_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_warm_start_vectors_reach_the_probe_and_the_block_solve():
    matrix = planted()
    vals, vecs = exact_top(matrix, 3)
    start = torch.from_numpy(vecs + 1e-3 * np.random.default_rng(0).standard_normal(vecs.shape))
    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=0.5)
    result = auto_eigensolve(op, 3, tol=1e-8, verbose=False, init_vecs=start)
    assert result.info["auto"]["solver"] == "block_lanczos"
    np.testing.assert_allclose(result.eigenvalues, vals, rtol=1e-7)
    with pytest.raises(TypeError, match="both"):
        auto_eigensolve(op, 3, init_vecs=start, init_vec=start[0])


def test_block_widths_respect_the_memory_cap():
    matrix = planted()
    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=0.01)
    n, k = op.size, 3
    from hessian_eigenthings.solvers.memory import native_plan

    cap = native_plan(block=True)(n, k, op.dtype, op.device, {"block_size": 4}).peak_bytes
    result = auto_eigensolve(op, k, tol=1e-8, verbose=False, max_basis_bytes=cap)
    info = result.info["auto"]
    assert info["solver"] == "block_lanczos" and info["block_size"] <= 4
    assert all(int(label.split("=")[1]) <= 4 for label in info["predicted_seconds"] if label.startswith("block"))


def test_options_that_name_a_solver_still_choose_it():
    matrix = planted()
    result = get_solver("auto").run(CostedMatrix(matrix), 3, block_size=3, tol=1e-8, verbose=False)
    assert "auto" not in result.info and result.info["block_size"] == 3
    with pytest.raises(TypeError, match="chose 'power_iter'"):
        get_solver("auto").run(CostedMatrix(matrix), 3, momentum=0.1, block_size=3)


def test_span_coefficients_accept_only_columns_inside_the_span():
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(500, 6, generator=gen))[0]
    inside = basis @ torch.randn(6, 3, generator=gen)
    outside = torch.randn(500, 1, generator=gen)
    almost = inside[:, :1] + 1e-4 * outside / outside.norm()
    mat = torch.cat([inside, outside, almost], dim=1)
    coefficients, ok = span_coefficients(basis, mat, 16 * torch.finfo(torch.float32).eps, rows=128)
    assert ok.tolist() == [True, True, True, False, False]
    assert torch.allclose(basis @ coefficients[:, :3].float(), inside, atol=1e-5)


def test_a_replayed_block_equals_the_computed_one():
    """The block answered from the probe is the product block Lanczos would have computed."""
    matrix = planted()
    calls = []
    real = auto_module._Replay._matmat

    def spy(self, mat):
        out = real(self, mat)
        calls.append((mat.clone(), out.clone()))
        return out

    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=0.5)
    try:
        auto_module._Replay._matmat = spy
        auto_eigensolve(op, 3, tol=1e-8, verbose=False)
    finally:
        auto_module._Replay._matmat = real
    mat, out = calls[0]
    assert torch.allclose(out, matrix @ mat, rtol=0, atol=1e-12 * float(matrix.abs().max()))


def test_block_lanczos_alone_matches_the_auto_switch():
    matrix = planted()
    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=0.5)
    result = auto_eigensolve(op, 3, tol=1e-8, verbose=False, seed=5)
    width = result.info["auto"]["block_size"]
    alone = block_lanczos(MatrixOperator(matrix), 3, block_size=width, tol=1e-8, verbose=False, seed=5)
    np.testing.assert_allclose(result.eigenvalues, alone.eigenvalues, rtol=1e-9)


@pytest.mark.parametrize("n", [13, 30])
def test_a_problem_too_small_for_a_block_basis_keeps_thick_restart(n):
    """Where n caps the basis block Lanczos would use (its product model was measured with its full
    default basis), blocks restart over and over: at n=13 block Lanczos took 117 products where
    thick-restart takes 13. Such a width is not considered."""
    matrix = planted_matrix(list(np.linspace(10.0, 1.0, n)), seed=n)[0]
    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=0.5)
    result = auto_eigensolve(op, 1, tol=1e-8, verbose=False)
    reference = thick_restart_lanczos(MatrixOperator(matrix), 1, tol=1e-8, verbose=False)
    assert result.info["auto"]["solver"] == "thick_restart" and result.info["auto"]["probe_products"] == 0
    assert result.num_products == reference.num_products
    np.testing.assert_allclose(result.eigenvalues, exact_top(matrix, 1)[0], rtol=1e-12)


def test_a_given_max_steps_keeps_thick_restart_which_it_was_written_for():
    """max_steps caps the fills of the basis, and block Lanczos needs more fills for the same pairs:
    a cap that thick-restart meets (one fill of 20 vectors for the top 5) left block Lanczos with
    no converged pair."""
    matrix = planted()
    keywords = dict(tol=1e-8, max_steps=1, num_lanczos_vectors=20, verbose=False)
    reference = thick_restart_lanczos(MatrixOperator(matrix), 5, **keywords)
    assert reference.converged.all()
    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=0.5)
    result = auto_eigensolve(op, 5, **keywords)
    assert result.info["auto"]["solver"] == "thick_restart" and result.info["auto"]["probe_products"] == 0
    assert result.converged.all() and result.num_products == reference.num_products
    np.testing.assert_array_equal(result.eigenvalues, reference.eigenvalues)


def test_a_warm_start_survives_the_switch_to_a_narrower_block():
    """The probe is 8 wide; block Lanczos at width 2 starts from the caller's vectors as it would
    alone (not from the probe's columns, which would add random directions to them), so its solve
    costs what block Lanczos alone costs from the same start."""
    matrix = planted()
    vals, vecs = exact_top(matrix, 3)
    start = torch.from_numpy(vecs + 1e-4 * np.random.default_rng(0).standard_normal(vecs.shape))
    op = CostedMatrix(matrix, single=5.0, shared=1.0, block_per_vector=0.5)
    result = auto_eigensolve(op, 3, tol=1e-8, verbose=False, init_vecs=start, seed=2)
    info = result.info["auto"]
    assert info["solver"] == "block_lanczos" and info["block_size"] == 2 and info["replayed_products"] == 2
    alone = block_lanczos(MatrixOperator(matrix), 3, block_size=2, tol=1e-8, verbose=False, init_vecs=start, seed=2)
    spent_before = info["decided_after_products"] + info["probe_products"] - info["replayed_products"]
    assert result.num_products == spent_before + alone.num_products
    np.testing.assert_allclose(result.eigenvalues, vals, rtol=1e-9)


def test_bad_options_are_refused_before_the_probe():
    """A slow kept product known from an earlier solve: the probe would be the call's first products."""
    op = CostedMatrix(planted())
    op.plans.force(KEPT, 1, 5.0)
    op.plans.force_shared(1.0)
    with pytest.raises(ValueError, match="which"):
        auto_eigensolve(op, 3, which="XX", verbose=False)
    with pytest.raises(ValueError, match="tol"):
        auto_eigensolve(op, 3, tol=-1.0, verbose=False)
    assert op.num_products == 0


@pytest.mark.parametrize("costs", [dict(single=5.0, shared=1.0, block_per_vector=0.5), {}])
def test_a_non_finite_product_names_the_callers_operator(costs):
    class NotFinite(CostedMatrix):
        def _matmat(self, mat):
            out = super()._matmat(mat)
            out[0, 0] = float("nan")
            return out

        def _matvec(self, vec):
            out = super()._matvec(vec)
            if len(self.widths) > SCREEN_AFTER + 1:
                out[0] = float("nan")
            return out

    from hessian_eigenthings import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"\(NotFinite\)"):
        auto_eigensolve(NotFinite(planted(), **costs), 3, tol=1e-8, verbose=False)
