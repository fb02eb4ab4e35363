"""Keeping first-order graphs inside Operator.frozen(): exact products, reuse, invalidation, budget."""

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_model_unchanged,
    batches,
    classification_data,
    dense_loss_hessian,
    model_snapshot,
    small_mlp,
)
from torch import nn

from hessian_eigenthings import HVPOperator, compute_hessian_eigenthings
from hessian_eigenthings.operators.base import MatrixOperator, runs_frozen
from hessian_eigenthings.operators.graph_cache import counting_saved_bytes
from hessian_eigenthings.solvers.thick_restart import thick_restart_lanczos


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class ForwardCounter:
    """Counts the model's forward passes that build a graph (a kept graph means no forward pass).

    Not counted: forward passes without gradients with which an operator finds whether a
    plain-function criterion averages or sums where a product's own outputs cannot show it
    (``probes``).
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.probes = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if torch.is_grad_enabled():
            self.calls += 1
        else:
            self.probes += 1

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture
def counted(mlp_problem):
    model, loader, _, _, hessian = mlp_problem
    counter = ForwardCounter(model)
    yield model, loader, hessian, counter
    counter.close()


@pytest.fixture(autouse=True)
def micro_batches_of_256_rows(monkeypatch):
    """Kept work is per micro-batch: these tests split every batch into micro-batches of 256 rows, as
    a GPU's default does (a CPU's default uses batches whole)."""
    from hessian_eigenthings.operators import model_operator, options

    def resolve(value, device):
        return options.resolve_max_possible_gpu_samples(256 if value is None else value, device)

    monkeypatch.setattr(model_operator, "resolve_max_possible_gpu_samples", resolve)


def micro_batches(loader, step=256):
    """Micro-batches of a list loader at 256 rows (see micro_batches_of_256_rows)."""
    return sum(-(-len(x) // step) for x, _ in loader)


def close(a, b, tol=1e-10):
    return torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max())


@pytest.mark.parametrize("batched", [False, True])
def test_products_in_a_frozen_block_are_exact_and_do_one_forward_pass_per_batch(counted, batched):
    model, loader, hessian, counter = counted
    before = model_snapshot(model)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, batched=batched)
    with op.frozen():
        for step in range(4):
            v = rand(op.size, seed=step)
            assert close(op.apply(v), hessian @ v)
            block = rand(op.size, 3, seed=10 + step)
            assert close(op.apply_block(block), hessian @ block)
        assert len(op._keeper.kept) == micro_batches(loader) == 3  # 500 = 256 + 244, and 12
        assert op.kept_graph_plan[3] == ("double_backward", batched)
    assert counter.calls == micro_batches(loader)  # only the first product ran the model
    assert counter.probes == 0  # the criterion's reduction was read off the first product's outputs
    assert len(op._keeper.kept) == 0  # freed at the block's end
    assert_model_unchanged(model, before)


def test_outside_a_frozen_block_every_product_runs_the_model(counted):
    model, loader, hessian, counter = counted
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    for step in range(3):
        v = rand(op.size, seed=step)
        assert close(op.apply(v), hessian @ v)
    assert counter.calls == 3 * micro_batches(loader)
    assert len(op._keeper.kept) == 0


def test_cache_graphs_false_and_no_batch_cache_keep_nothing(counted):
    model, loader, hessian, counter = counted
    for kwargs in ({"cache_graphs": False}, {"cache_batches": False}):
        counter.calls = 0
        op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, **kwargs)
        with op.frozen():
            for step in range(3):
                v = rand(op.size, seed=step)
                assert close(op.apply(v), hessian @ v)
            assert len(op._keeper.kept) == 0
        assert counter.calls == 3 * micro_batches(loader)


def test_forced_forward_over_reverse_keeps_no_graph(counted):
    model, loader, hessian, counter = counted
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, backend="forward_over_reverse")
    with op.frozen():
        for step in range(2):
            v = rand(op.size, seed=step)
            assert close(op.apply(v), hessian @ v, 1e-9)
        assert len(op._keeper.kept) == 0


def test_a_parameter_changed_inside_the_block_rebuilds_the_graphs():
    model = small_mlp(seed=3)
    x, y = classification_data(num=96)
    loader = batches(x, y, [64, 32])
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    v = rand(op.size, seed=1)
    with op.frozen():
        assert close(op.apply(v), dense_loss_hessian(model, F.cross_entropy, x, y) @ v)
        with torch.no_grad():
            model[0].weight.add_(0.3)  # in place, as an optimizer step would
        assert close(op.apply(v), dense_loss_hessian(model, F.cross_entropy, x, y) @ v)
        model[0].weight = nn.Parameter(model[0].weight.detach() * 0.5)  # replaced
        op_new = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)  # sees the new tensor
        with op_new.frozen():
            assert close(op_new.apply(v), dense_loss_hessian(model, F.cross_entropy, x, y) @ v)


def test_budget_keeps_a_prefix_of_the_batches_and_products_stay_exact():
    model = small_mlp(seed=1)
    x, y = classification_data(num=160)
    loader = batches(x, y, [40, 40, 40, 40])
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    with op.frozen():
        op.apply(rand(op.size))
        per_batch = op._keeper.kept.bytes / 4
        assert len(op._keeper.kept) == 4 and per_batch > 0
    counter = ForwardCounter(model)
    try:
        op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, graph_cache_max_bytes=int(2.5 * per_batch))
        with op.frozen():
            for step in range(3):
                v = rand(op.size, seed=step)
                assert close(op.apply(v), hessian @ v)
            assert len(op._keeper.kept) == 2
        # 4 forward passes in the first product, then only the 2 batches that were not kept.
        assert counter.calls == 4 + 2 * 2
    finally:
        counter.close()


def test_saved_bytes_count_activations_not_parameters_or_inputs():
    layer = nn.Linear(50, 40, dtype=torch.float64)
    x = torch.randn(30, 50, dtype=torch.float64)
    with counting_saved_bytes(list(layer.parameters()) + [x]) as saved:
        out = torch.tanh(layer(x)).sum()
    # linear saves x and the weight (both excluded); tanh saves its (30, 40) output.
    assert saved.total == 30 * 40 * 8
    out.backward()  # the graph is intact


def test_kept_graphs_are_freed_when_the_block_ends(mlp_problem):
    model, loader, _, _, _ = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    with op.frozen():
        op.apply(rand(op.size))
        # The loss and the gradients hold the graphs; nothing else refers to them.
        held = [weakref.ref(t) for g in op._keeper.kept.graphs.values() for t in (g.loss, *g.grads)]
        assert len(held) == 3 * 7 and all(ref() is not None for ref in held)
    gc.collect()
    assert all(ref() is None for ref in held)


def test_nested_blocks_keep_the_graphs_until_the_outermost_ends(counted):
    model, loader, hessian, counter = counted
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    with op.frozen():
        with op.frozen():
            op.apply(rand(op.size))
        assert len(op._keeper.kept) == micro_batches(loader)
        op.apply(rand(op.size, seed=1))
    assert counter.calls == micro_batches(loader) and len(op._keeper.kept) == 0


def test_an_error_inside_the_block_frees_the_graphs_and_leaves_the_model_as_it_was(mlp_problem):
    model, loader, _, _, _ = mlp_problem
    before = model_snapshot(model)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    with pytest.raises(RuntimeError, match="stop"):
        with op.frozen():
            op.apply(rand(op.size))
            raise RuntimeError("stop")
    assert len(op._keeper.kept) == 0
    assert_model_unchanged(model, before)


def test_nan_vector_inside_the_block_raises_and_the_next_product_is_exact(counted):
    model, loader, hessian, _ = counted
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    with op.frozen():
        op.apply(rand(op.size))
        bad = rand(op.size)
        bad[3] = float("nan")
        with pytest.raises(ValueError):
            op.apply(bad)
        v = rand(op.size, seed=5)
        assert close(op.apply(v), hessian @ v)


def test_eval_mode_false_with_dropout_keeps_graphs_and_the_same_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 4)).double()
    x, y = classification_data(num=80)
    loader = batches(x, y, [50, 30])
    plain = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, eval_mode=False)
    kept = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, eval_mode=False)
    with kept.frozen():
        for step in range(3):
            v = rand(plain.size, seed=step)
            assert close(kept.apply(v), plain.apply(v))
        assert len(kept._keeper.kept) == 2


def test_eval_mode_false_with_batchnorm_keeps_no_graph_and_stays_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4)).double()
    x, y = classification_data(num=80)
    loader = batches(x, y, [40, 40])
    before = model_snapshot(model)
    plain = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, eval_mode=False)
    frozen = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, eval_mode=False)
    with frozen.frozen():
        for step in range(2):
            v = rand(plain.size, seed=step)
            assert close(frozen.apply(v), plain.apply(v))
        assert len(frozen._keeper.kept) == 0
    assert_model_unchanged(model, before)


def test_solvers_run_frozen_and_match_the_uncached_answer(counted):
    model, loader, hessian, counter = counted
    exact = np.sort(np.abs(np.linalg.eigvalsh(hessian.numpy())))[::-1][:3]
    results = {}
    for cache in (True, False):
        counter.calls = 0
        op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, cache_graphs=cache)
        result = thick_restart_lanczos(op, 3, tol=1e-8, verbose=False)
        results[cache] = (np.sort(np.abs(result.eigenvalues))[::-1], op.num_products, counter.calls)
    np.testing.assert_allclose(results[True][0], exact, rtol=1e-8)
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-10)
    assert results[True][2] == micro_batches(loader)  # one forward pass per batch for the whole solve
    assert results[False][2] >= 10 * micro_batches(loader)  # without kept graphs: every product runs the model


def test_compute_hessian_eigenthings_every_mode_matches_with_one_forward_pass_per_batch(counted):
    model, loader, hessian, counter = counted
    exact = np.sort(np.abs(np.linalg.eigvalsh(hessian.numpy())))[::-1][:2]
    for mode in ("lanczos", "thick_restart", "block_lanczos", "power_iter"):
        counter.calls = 0
        options = {"power_iter_steps": 400, "power_iter_err_threshold": 1e-7} if mode == "power_iter" else {}
        vals, _ = compute_hessian_eigenthings(
            model, loader, F.cross_entropy, 2, mode=mode, use_gpu=False, max_possible_gpu_samples=256, verbose=False,
            **options,
        )
        np.testing.assert_allclose(np.sort(np.abs(vals))[::-1], exact, rtol=1e-5, err_msg=mode)
        assert counter.calls == micro_batches(loader), mode


def test_runs_frozen_passes_matrices_through():
    calls = []

    @runs_frozen
    def solver(operator, scale=1.0):
        calls.append(operator)
        return scale

    matrix = torch.eye(3, dtype=torch.float64)
    assert solver(matrix, scale=2.0) == 2.0 and calls[-1] is matrix
    op = MatrixOperator(matrix)
    assert solver(operator=op) == 1.0 and calls[-1] is op


def test_spectrum_estimators_run_frozen_with_one_forward_pass_per_batch(counted):
    from hessian_eigenthings.spectrum.dense import dense_matrix
    from hessian_eigenthings.spectrum.diagonal import exact_diagonal
    from hessian_eigenthings.spectrum.trace import hutchinson_trace, hutchpp_trace
    from hessian_eigenthings.spectrum.density import spectral_density

    model, loader, hessian, counter = counted
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    dense = dense_matrix(op, block_size=300, verbose=False)
    assert close(dense, hessian)
    assert counter.calls == micro_batches(loader)
    counter.calls = 0
    for probes_per_block in (1, 3):
        density = spectral_density(op, num_probes=3, num_steps=8, probes_per_block=probes_per_block, verbose=False)
        assert density.num_products == 24
    assert counter.calls == 2 * micro_batches(loader)
    counter.calls = 0
    trace = hutchinson_trace(op, max_products=48, verbose=False)
    assert abs(trace.estimate - float(torch.trace(hessian))) < 5 * trace.std_error
    hutchpp_trace(op, max_products=48, verbose=False)
    diagonal = exact_diagonal(op, block_size=500, verbose=False)
    assert close(torch.as_tensor(diagonal.diagonal), torch.diagonal(hessian))
    assert counter.calls == 3 * micro_batches(loader)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kept_graphs_on_cuda_with_a_device_copy_of_a_cpu_model():
    model = small_mlp(seed=4)
    x, y = classification_data(num=300)
    loader = batches(x, y, [200, 100])
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=True)  # a CUDA copy of the CPU model
    assert op.device.type == "cuda" and op._work_model is not model
    counter = ForwardCounter(op._work_model)
    try:
        with op.frozen():
            for step in range(3):
                v = rand(op.size, seed=step)
                assert close(op.apply(v.cuda()).cpu(), hessian @ v)
                block = rand(op.size, 4, seed=step)
                assert close(op.apply_block(block.cuda()).cpu(), hessian @ block)
            assert len(op._keeper.kept) == 2
            with torch.no_grad():  # the user's model changes: the copy is synced, the graphs rebuilt
                model[0].bias.add_(0.1)
            changed = dense_loss_hessian(model, F.cross_entropy, x, y)
            v = rand(op.size, seed=9)
            assert close(op.apply(v.cuda()).cpu(), changed @ v)
        assert counter.calls == 2 * 2 and len(op._keeper.kept) == 0
    finally:
        counter.close()


def test_kept_graphs_for_a_parameter_subset_and_an_unused_parameter():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = small_mlp(seed=2)
            self.unused = nn.Linear(3, 3, dtype=torch.float64)  # no curvature: zero rows and columns

        def forward(self, inputs):
            return self.body(inputs)

    model = WithUnused()
    x, y = classification_data(num=64)
    loader = batches(x, y, [40, 24])
    names = ["body.2.weight", "body.4.bias", "unused.weight"]
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y, names=names)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, params=names)
    with op.frozen():
        for step in range(3):
            block = rand(op.size, 2, seed=step)
            assert close(op.apply_block(block), hessian @ block)
        assert len(op._keeper.kept) == 2


def test_a_failing_vmapped_second_backward_falls_back_on_the_kept_graph(counted, monkeypatch, caplog):
    import logging

    import hessian_eigenthings.operators.hvp as hvp_module

    real = hvp_module.second_backward

    def no_vmap(graph, params, tangents, batched, keep):
        if batched:
            raise RuntimeError("vmap: no batching rule for this op (simulated)")
        return real(graph, params, tangents, batched, keep)

    monkeypatch.setattr(hvp_module, "second_backward", no_vmap)
    model, loader, hessian, counter = counted
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, batched=True)
    with caplog.at_level(logging.INFO, logger="hessian_eigenthings"), op.frozen():
        for step in range(3):
            block = rand(op.size, 4, seed=step)
            assert close(op.apply_block(block), hessian @ block)
    assert counter.calls == micro_batches(loader)  # the kept graphs survived the failed attempt
    assert op.kept_graph_plan[4] == ("double_backward", False)
    assert len([r for r in caplog.records if "does not work for this model" in r.getMessage()]) == 1


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_ggn_and_empirical_fisher_keep_their_work_and_stay_exact(mlp_problem, per_sample):
    from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator

    model, loader, _, _, _ = mlp_problem
    for make in (lambda **kw: GGNOperator(model, loader, F.cross_entropy, use_gpu=False, **kw),
                 lambda **kw: EmpiricalFisherOperator(model, loader, F.cross_entropy, use_gpu=False,
                                                      per_sample=per_sample, **kw)):
        reference = make(cache_graphs=False)
        op = make()
        counter = ForwardCounter(model)
        try:
            with op.frozen():
                for step in range(3):
                    block = rand(op.size, 3, seed=step)
                    assert close(op.apply_block(block), reference.apply_block(block))
                    v = rand(op.size, seed=20 + step)
                    assert close(op.apply(v), reference.apply(v))
                assert len(op._keeper.kept) == micro_batches(loader)
            # The reference ran the model in each of its 6 products; the kept operator only in its first.
            per_pass = counter.calls // 7
            assert per_pass > 0 and counter.calls == 7 * per_pass and len(op._keeper.kept) == 0
        finally:
            counter.close()


@pytest.mark.parametrize("where", ["build", "second_backward"])
def test_out_of_device_memory_with_kept_work_frees_it_and_goes_on_afresh(counted, monkeypatch, caplog, where):
    import logging

    import hessian_eigenthings.operators.hvp as hvp_module

    real = {"build": hvp_module.first_order_graph, "second_backward": hvp_module.second_backward}[where]
    calls = {"n": 0}

    def once_out_of_memory(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the third micro-batch of the first product, or the first of the second
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(hvp_module, "first_order_graph" if where == "build" else "second_backward", once_out_of_memory)
    model, loader, hessian, counter = counted
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    with caplog.at_level(logging.INFO, logger="hessian_eigenthings"), op.frozen():
        for step in range(3):
            v = rand(op.size, seed=step)
            assert close(op.apply(v), hessian @ v)
        assert len(op._keeper.kept) == 0 and op._keeper.kept.full
    warnings = [r for r in caplog.records if "out of device memory" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert counter.calls > micro_batches(loader)  # computed afresh after giving up


def test_a_stochastic_operator_over_a_list_keeps_each_batch_graph_and_cycles_exactly():
    model = small_mlp(seed=5)
    x, y = classification_data(num=90)
    loader = batches(x, y, [40, 30, 20])
    per_batch = [dense_loss_hessian(model, F.cross_entropy, bx, by) for bx, by in loader]
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, full_dataset=False)
    counter = ForwardCounter(model)
    try:
        with op.frozen():
            for step in range(7):  # more than two cycles through the three batches
                v = rand(op.size, seed=step)
                assert close(op.apply(v), per_batch[step % 3] @ v)
            assert len(op._keeper.kept) == 3
        assert counter.calls == 3  # each batch ran the model once
    finally:
        counter.close()


def test_a_stochastic_operator_over_a_dataloader_keeps_nothing():
    from torch.utils.data import DataLoader, TensorDataset

    model = small_mlp(seed=6)
    x, y = classification_data(num=60)
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    per_batch = [dense_loss_hessian(model, F.cross_entropy, x[i : i + 20], y[i : i + 20]) for i in (0, 20, 40)]
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, full_dataset=False)
    with op.frozen():
        for step in range(4):
            v = rand(op.size, seed=step)
            assert close(op.apply(v), per_batch[step % 3] @ v)
            assert len(op._keeper.kept) == 0


class InPlaceOnSaved(nn.Module):
    """Changes a tensor that autograd saved (sigmoid saves its output): autograd refuses it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(10, 8, dtype=torch.float64)
        self.last = nn.Linear(8, 4, dtype=torch.float64)

    def forward(self, inputs):
        hidden = torch.sigmoid(self.first(inputs))
        hidden.mul_(2.0)
        return self.last(hidden)


def test_a_model_that_modifies_a_saved_tensor_in_place_raises_inside_frozen_as_outside():
    x, y = classification_data(num=40)
    model = InPlaceOnSaved()
    op = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False)
    v = rand(op.size)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        op.apply(v)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"), op.frozen():
        op.apply(v)


def test_dropout_with_a_budget_for_part_of_the_pass_keeps_nothing_and_stays_the_same_operator(caplog):
    import logging

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 4)).double()
    x, y = classification_data(num=90)
    loader = batches(x, y, [30, 30, 30])
    plain = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, eval_mode=False)
    sizer = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, eval_mode=False)
    with sizer.frozen():
        sizer.apply(rand(sizer.size))
        one_batch = sizer._keeper.kept.bytes / 3
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, eval_mode=False,
                     graph_cache_max_bytes=int(1.5 * one_batch))
    with caplog.at_level(logging.INFO, logger="hessian_eigenthings"), op.frozen():
        for step in range(3):
            v = rand(op.size, seed=step)
            assert close(op.apply(v), plain.apply(v))
        assert len(op._keeper.kept) == 0 and op._keeper.kept.full
    assert any("all micro-batches or none" in r.getMessage() for r in caplog.records)


class GradientInForward(nn.Module):
    """A model whose forward pass differentiates with torch.func (as in energy-based models)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 1)).double()
        self.head = nn.Linear(10, 4, dtype=torch.float64)

    def forward(self, inputs):
        from torch.func import functional_call, grad, vmap

        params = dict(self.net.named_parameters())
        energy = lambda sample: functional_call(self.net, params, (sample,)).sum()  # noqa: E731
        return self.head(vmap(grad(energy))(inputs))


def test_a_model_using_torch_func_in_its_forward_pass_works_inside_frozen_and_keeps_nothing():
    x, y = classification_data(num=30)
    model = GradientInForward()
    plain = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, backend="double_backward")
    op = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, backend="double_backward")
    with op.frozen():
        for step in range(2):
            v = rand(op.size, seed=step)
            assert close(op.apply(v), plain.apply(v))
        assert len(op._keeper.kept) == 0 and op.cache_graphs is False  # refused once, then not tried again
    result = thick_restart_lanczos(op, 1, tol=1e-6, verbose=False)
    assert result.converged.all()


def test_clear_batch_cache_inside_frozen_drops_the_kept_graphs():
    model = small_mlp(seed=7)
    x, y = classification_data(num=64)
    data = [(x.clone(), y.clone())]
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    v = rand(op.size)
    with op.frozen():
        assert close(op.apply(v), dense_loss_hessian(model, F.cross_entropy, x, y) @ v)
        data[0][0].mul_(0.5)  # new data, announced as the README says
        op.clear_batch_cache()
        assert len(op._keeper.kept) == 0
        assert close(op.apply(v), dense_loss_hessian(model, F.cross_entropy, 0.5 * x, y) @ v)
