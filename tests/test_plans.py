"""The plan book (what each way to compute a product cost), the choice of plan, and the linearize backend."""

import pytest
import torch
import torch.nn.functional as F

from hessian_eigenthings import HVPOperator
from hessian_eigenthings.operators.hvp import _pass_estimates
from hessian_eigenthings.operators.plans import (
    MIN_TRIAL_SECONDS,
    RETRY_MARGIN,
    SKIP_FACTOR,
    SLOW_SECOND_PASS,
    Plan,
    PlanBook,
    cheapest,
    next_trial,
)

KEPT = Plan("double_backward", False, kept=True)
KEPT_VMAP = Plan("double_backward", True, kept=True)
FRESH_VMAP = Plan("forward_over_reverse", True)
FRESH_SINGLE = Plan("forward_over_reverse", False)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(a, b, tol=1e-10):
    return torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max())


# -- the book ------------------------------------------------------------------------------------
def test_the_book_keeps_the_smallest_time_and_forced_costs_win():
    book = PlanBook()
    assert book.seconds(KEPT, 1) is None and book.trials(KEPT, 1) == 0
    book.record(KEPT, 1, 0.3)
    book.record(KEPT, 1, 0.2, peak_bytes=100)
    assert book.seconds(KEPT, 1) == 0.2 and book.trials(KEPT, 1) == 2 and book.peak_bytes(KEPT, 1) == 100
    # a kept double backward one vector at a time costs width kept single products: no trial needed
    assert book.seconds(Plan("double_backward", False, kept=True), 5) == pytest.approx(1.0)
    assert book.trials(Plan("double_backward", False, kept=True), 5) == 3
    book.force(KEPT, 1, 0.5)
    book.record(KEPT, 1, 0.01)
    assert book.seconds(KEPT, 1) == 0.5
    with pytest.raises(ValueError, match="positive"):
        book.force(KEPT, 1, 0.0)
    summary = book.summary()
    assert summary["kept double-backward x1"]["forced"] and summary["kept double-backward x1"]["seconds"] == 0.5


def test_predictions_for_widths_not_timed():
    book = PlanBook()
    assert book.predict(FRESH_VMAP, 4) is None
    book.record(FRESH_VMAP, 8, 8.0)
    assert book.predict(FRESH_VMAP, 4) == pytest.approx(4.0)  # nothing shared known: proportional
    book.force_shared(2.0)  # T(b) = 2 + 0.75 b through the one width timed
    assert book.predict(FRESH_VMAP, 4) == pytest.approx(5.0)
    book.record(FRESH_SINGLE, 1, 3.0)  # the single vector is the family's width 1: fit T(b) = F + J b
    assert book.predict(FRESH_VMAP, 16) == pytest.approx(3.0 + 5.0 / 7.0 * 15, rel=1e-9)
    book.record(KEPT_VMAP, 4, 2.0)  # kept plans: the cost per vector of the nearest width
    assert book.predict(KEPT_VMAP, 16) == pytest.approx(8.0)
    assert book.measured() == {(FRESH_VMAP, 8), (FRESH_SINGLE, 1), (KEPT_VMAP, 4)}


def test_the_second_pass_ratio_and_when_it_is_slow():
    book = PlanBook()
    assert book.second_pass_ratio() is None and not book.second_pass_is_slow()
    book.record(KEPT, 1, 0.5)
    book.record_build(KEPT, 1, 0.7)  # no paired timings: building product less kept product
    assert book.shared_seconds() == pytest.approx(0.2) and book.second_pass_ratio() == pytest.approx(2.5)
    book.record_build(KEPT, 1, 0.7, shared=0.1, ratio=4.0)
    assert book.shared_seconds() == pytest.approx(0.1) and book.second_pass_ratio() == 4.0
    assert book.second_pass_is_slow() and not book.second_pass_is_slow(threshold=5.0)
    fast = PlanBook()
    fast.record(KEPT, 1, MIN_TRIAL_SECONDS / 2)
    fast.record_build(KEPT, 1, 1.0, shared=0.001, ratio=10 * SLOW_SECOND_PASS)
    assert not fast.second_pass_is_slow()  # milliseconds are never second-guessed


def test_paired_estimates_leave_out_the_warm_up_of_the_first_micro_batch():
    # micro-batch 1 carries one second of warm-up; the pass is then 10 ms per 100 rows everywhere
    times = [[100, 1.01, 0.05], [100, 0.01, 0.05], [50, 0.005, 0.025]]
    shared, ratio = _pass_estimates(times, width=1)
    assert shared == pytest.approx(0.025) and ratio == pytest.approx(5.0)
    assert _pass_estimates([], 1) == (None, None) and _pass_estimates(None, 1) == (None, None)


def test_the_widest_block_that_fits():
    book = PlanBook()
    assert book.widest(FRESH_VMAP, 16, None) == 16
    assert book.note_out_of_memory(FRESH_VMAP, 16) == 8 and book.widest(FRESH_VMAP, 16, None) == 8
    book.record(FRESH_VMAP, 4, 1.0, peak_bytes=4000)  # 1000 bytes per vector
    assert book.widest(FRESH_VMAP, 8, free_bytes=6000) == 5
    assert book.summary()["widest that fitted"] == {"forward-over-reverse batched": 8}


# -- the trials -----------------------------------------------------------------------------------
def test_each_candidate_once_then_the_close_ones_again():
    book = PlanBook()
    candidates = [KEPT_VMAP, FRESH_VMAP]
    assert next_trial(book, candidates, 4) == KEPT_VMAP
    book.record(KEPT_VMAP, 4, 1.0)
    assert next_trial(book, candidates, 4) == FRESH_VMAP
    book.record(FRESH_VMAP, 4, 1.1)  # within RETRY_MARGIN of the best: both again
    assert 1.1 <= RETRY_MARGIN
    assert next_trial(book, candidates, 4) == KEPT_VMAP
    book.record(KEPT_VMAP, 4, 0.9)
    assert next_trial(book, candidates, 4) == FRESH_VMAP
    book.record(FRESH_VMAP, 4, 0.8)
    assert next_trial(book, candidates, 4) is None and cheapest(book, candidates, 4) == FRESH_VMAP


def test_a_clearly_slower_candidate_is_timed_once_and_a_predicted_slow_one_never():
    book = PlanBook()
    book.record(KEPT_VMAP, 4, 1.0)
    book.record(FRESH_VMAP, 4, 2.0)
    assert next_trial(book, [KEPT_VMAP, FRESH_VMAP], 4) == KEPT_VMAP  # the best gets its second trial
    book.record(KEPT_VMAP, 4, 1.0)
    assert next_trial(book, [KEPT_VMAP, FRESH_VMAP], 4) is None
    other = PlanBook()
    other.record(FRESH_VMAP, 8, 8.0 * SKIP_FACTOR)  # predicted at SKIP_FACTOR per vector at width 2 ...
    other.record(KEPT_VMAP, 2, 1.0)  # ... against 0.5 timed: not worth a trial
    assert next_trial(other, [FRESH_VMAP, KEPT_VMAP], 2) == KEPT_VMAP
    other.record(KEPT_VMAP, 2, 1.0)
    assert next_trial(other, [FRESH_VMAP, KEPT_VMAP], 2) is None


# -- the operator's choice inside frozen() -------------------------------------------------------
def slow_second_pass(op):
    """Costs that make the kept second pass slow (10x the shared pass), as on a GPU ResNet."""
    op.plans.force(KEPT, 1, 1.0)
    op.plans.force_shared(0.1)


def counting(model):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    return calls, handle


def test_inside_frozen_a_block_may_be_computed_afresh_while_singles_keep_the_kept_graph(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=256)  # 3 micro-batches
    slow_second_pass(op)
    op.plans.force(FRESH_SINGLE, 1, 5.0)  # single vectors: the kept graph is faster
    op.plans.force(KEPT_VMAP, 4, 4.0)
    op.plans.force(FRESH_VMAP, 4, 0.5)
    calls, handle = counting(model)
    try:
        with op.frozen():
            v = rand(op.size, seed=1)
            assert close(op.apply(v), hessian @ v)  # builds the kept graphs (3 micro-batches)
            for step in range(2):
                block = rand(op.size, 4, seed=step)
                assert close(op.apply_block(block), hessian @ block)  # afresh: 3 forward passes each
            assert len(op._keeper) == 3  # the kept graphs stayed
            assert close(op.apply(v), hessian @ v)  # through them: no forward pass
    finally:
        handle.remove()
    assert sum(calls) == 3 + 2 * 3
    assert op.kept_graph_plan[4] == FRESH_VMAP.pair and op.kept_graph_plan[1] == KEPT.pair


def test_a_slow_second_pass_tries_forward_over_reverse_for_single_vectors(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=256)
    slow_second_pass(op)
    with op.frozen():
        for step in range(4):
            v = rand(op.size, seed=step)
            assert close(op.apply(v), hessian @ v)
    assert op.plans.trials(FRESH_SINGLE, 1) >= 1
    assert op.kept_graph_plan[1] == FRESH_SINGLE.pair  # milliseconds against the forced second


def test_without_a_slow_second_pass_blocks_inside_frozen_reuse_the_kept_graph(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=256)
    op.plans.force(KEPT, 1, 1.0)
    op.plans.force_shared(0.9)
    calls, handle = counting(model)
    try:
        with op.frozen():
            for step in range(4):
                block = rand(op.size, 3, seed=step)
                assert close(op.apply_block(block), hessian @ block)
    finally:
        handle.remove()
    assert sum(calls) == 3
    assert op.plans.trials(FRESH_VMAP, 3) == 0


# -- linearize ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batched", [False, True])
def test_linearize_is_exact_kept_inside_frozen_and_forward_over_reverse_outside(mlp_problem, batched):
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, backend="linearize", batched=batched, max_possible_gpu_samples=256)
    block = rand(op.size, 3, seed=4)
    assert close(op.apply_block(block), hessian @ block)  # outside frozen: nothing kept
    assert op.backend_used[3] == ("forward_over_reverse", batched)
    calls, handle = counting(model)
    try:
        with op.frozen():
            for step in range(3):
                block = rand(op.size, 3, seed=step)
                assert close(op.apply_block(block), hessian @ block)
                traced = len(calls)
                assert close(op.apply(block[:, 0]), hessian @ block[:, 0])
            assert len(op._keeper) == 3 and op._keeper.kept.bytes > 0
    finally:
        handle.remove()
    assert len(calls) == traced > 0  # traced in the first product (per micro-batch), never again
    assert op.kept_graph_plan[3] == ("linearize", batched)


def test_linearize_needs_eval_mode(mlp_problem):
    model, loader, _, _, _ = mlp_problem
    with pytest.raises(ValueError, match="eval_mode=True"):
        HVPOperator(model, loader, F.cross_entropy, use_gpu=False, backend="linearize", eval_mode=False)


# -- GPU --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_trials_record_peak_memory_and_blocks_stay_exact(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, device="cuda")
    block = rand(op.size, 8, seed=2)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()  # earlier tests' peaks would hide ours (the operator never resets it)
    user_peak = 0
    for _ in range(6):
        got = op.apply_block(block.cuda()).cpu()
        assert close(got, hessian @ block)
        assert torch.cuda.max_memory_allocated() >= user_peak  # the user's statistic only grows
        user_peak = torch.cuda.max_memory_allocated()
    peaks = [op.plans.peak_bytes(plan, 8) for plan, width in op.plans.measured() if width == 8]
    assert any(peak is not None and peak > 0 for peak in peaks)  # the first product of a block sets a new peak
