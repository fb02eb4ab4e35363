"""The Hessian analysis object: every method against dense float64 references and the one-call
helpers, the data read once, forward passes shared inside ``with``, views, and the model left as it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analysis_helpers import CountingLoader, ForwardCounter, dense_ggn_cross_entropy
from helpers import (
    assert_model_unchanged,
    batches,
    classification_data,
    dense_loss_hessian,
    exact_top,
    model_snapshot,
    small_mlp,
)
from hessian_eigenthings import (
    GGNOperator,
    Hessian,
    PCHOperator,
    compute_hessian_eigenthings,
    hessian_density,
    hessian_trace,
)

F = nn.functional


@pytest.fixture(scope="module")
def problem():
    """A float64 tanh MLP (196 parameters), 150 samples in three batches, its exact Hessian and GGN."""
    model = small_mlp(width=8)
    x, y = classification_data(num=150)
    data = batches(x, y, [64, 64, 22])
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
    ggn = dense_ggn_cross_entropy(model, x, y)
    return model, x, y, data, hessian, ggn


def test_eigenvalues_trace_density_dense_diagonal_match_dense_references(problem):
    model, _, _, data, hessian, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    assert h.size == hessian.shape[0] and h.curvature == "hessian"
    values, vectors = h.eigenvalues(4, which="LA")
    ref_values, _ = exact_top(hessian, 4, "LA")
    assert np.allclose(values, ref_values, rtol=1e-8, atol=1e-10)
    assert h.eigenpairs is not None and h.eigenpairs.eigenvalues is values
    assert torch.allclose(h.dense(), hessian, rtol=1e-9, atol=1e-12)
    assert torch.allclose(h.diagonal("exact").diagonal, hessian.diagonal(), rtol=1e-9, atol=1e-12)
    trace = h.trace(max_products=60)
    assert abs(trace.estimate - float(hessian.trace())) < 5 * trace.std_error + 1e-9
    frob = h.frobenius(max_products=60)
    assert abs(frob.estimate - float((hessian**2).sum())) < 5 * frob.std_error + 1e-9
    density = h.density(num_probes=4, num_steps=30, seed=3)
    exact_values = np.linalg.eigvalsh(hessian.numpy())
    low, high = density.extremes
    assert low == pytest.approx(exact_values[0], abs=1e-6 * abs(exact_values).max())
    assert high == pytest.approx(exact_values[-1], rel=1e-8)


def test_methods_give_what_the_one_call_helpers_give(problem):
    model, _, _, data, _, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    ours = h.eigenvalues(3)
    theirs = compute_hessian_eigenthings(model, data, F.cross_entropy, num_eigenthings=3, verbose=False)
    assert np.allclose(ours.eigenvalues, theirs.eigenvalues, rtol=1e-10)
    assert h.trace(max_products=30, seed=5).estimate == pytest.approx(
        hessian_trace(model, data, F.cross_entropy, max_products=30, seed=5, verbose=False).estimate, rel=1e-10)
    ours_density = h.density(num_probes=3, num_steps=20, seed=1)
    theirs_density = hessian_density(model, data, F.cross_entropy, num_probes=3, num_steps=20, seed=1, verbose=False)
    assert np.allclose(ours_density.ritz_values, theirs_density.ritz_values, rtol=1e-9, atol=1e-10)
    ggn_trace = h.ggn().trace(max_products=30, seed=2).estimate
    assert ggn_trace == pytest.approx(hessian_trace(model, data, F.cross_entropy, curvature="ggn", max_products=30,
                                                    seed=2, verbose=False).estimate, rel=1e-10)


def test_pyhessian_call_with_one_batch(problem):
    model, x, y, _, _, _ = problem
    batch = (x[:50], y[:50])
    exact = dense_loss_hessian(model, F.cross_entropy, *batch)
    for h in (Hessian(model, F.cross_entropy, data=batch, verbose=False),
              Hessian(model, loss=F.cross_entropy, data=batch, verbose=False),
              Hessian(model, batch, F.cross_entropy, verbose=False)):
        assert torch.allclose(h.dense(), exact, rtol=1e-9, atol=1e-12)
        assert h.operator.num_samples == 50


def test_views_and_per_layer_read_the_data_once(problem):
    model, _, _, data, _, _ = problem
    loader = CountingLoader(data)
    h = Hessian(model, loader, F.cross_entropy, verbose=False)
    h.eigenvalues(2)
    h.trace(max_products=20)
    h.density(num_probes=2, num_steps=10)
    h.ggn().trace(max_products=20)
    h.fisher().eigenvalues(1)
    h.per_layer(curvatures=("hessian", "ggn"), exact_max_size=20, max_products=20)
    h.landscape_1d(steps=3)
    h.landscape_2d(("random", 0), steps=3)
    h.loss_and_gradient()
    assert loader.iterations == 1 and loader.batches_read == len(data)
    assert h.ggn() is h.ggn() and h.ggn().hessian() is h
    h.clear_batch_cache()
    h.ggn().trace(max_products=20)
    assert loader.iterations == 2


def test_forward_passes_are_shared_inside_the_with_block(problem):
    model, _, _, data, hessian, _ = problem
    counter = ForwardCounter(model)
    try:
        h = Hessian(model, data, F.cross_entropy, reduction="mean", verbose=False)
        h.eigenvalues(2)
        h.trace(max_products=20)
        h.density(num_probes=2, num_steps=10)
        outside = counter.calls
        assert outside == 3 * len(data)  # each call builds its graphs once
        counter.calls = 0
        with h:
            h.eigenvalues(2)
            h.trace(max_products=20)
            h.density(num_probes=2, num_steps=10)
            g = h.ggn()  # made inside the block: held too
            g.trace(max_products=20)
            g.eigenvalues(1)
        assert counter.calls == 2 * len(data)  # one forward pass per batch and operator
        counter.calls = 0
        with h:
            h.eigenvalues(1)
            with torch.no_grad():  # a change the version counters show: the graphs are rebuilt
                model[0].weight.add_(0.01)
            changed = h.eigenvalues(1, which="LA")
            with torch.no_grad():
                model[0].weight.sub_(0.01)
            h.trace(max_products=20)
        assert counter.calls == 3 * len(data)
        x = torch.cat([b[0] for b in data])
        y = torch.cat([b[1] for b in data])
        with torch.no_grad():
            model[0].weight.add_(0.01)
        try:
            moved = dense_loss_hessian(model, F.cross_entropy, x, y)
        finally:
            with torch.no_grad():
                model[0].weight.sub_(0.01)
        assert changed.eigenvalues[0] == pytest.approx(exact_top(moved, 1, "LA")[0][0], rel=1e-8)
    finally:
        counter.remove()


def test_eigenpairs_are_forgotten_when_the_model_changes(problem):
    model, _, _, data, _, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    h.eigenvalues(2)
    assert h.eigenpairs is not None
    with torch.no_grad():
        model[0].bias.add_(1.0)
        model[0].bias.sub_(1.0)  # same values, new version: the pairs may be stale
    assert h.eigenpairs is None
    with pytest.raises(ValueError, match="call eigenvalues"):
        h.trace(deflate=True)


def test_deflated_trace_is_exact_part_plus_an_estimate_of_the_rest(problem):
    model, _, _, data, hessian, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    values, _ = h.eigenvalues(6, which="LA")
    plain = h.trace("hutchinson", max_products=40, seed=0)
    deflated = h.trace("hutchinson", deflate=True, max_products=40, seed=0)
    assert deflated.info["eigenvalue_part"] == pytest.approx(float(np.sum(values)))
    assert deflated.info["deflated"] == 6 and deflated.num_products == 40
    exact = float(hessian.trace())
    assert abs(deflated.estimate - exact) < 5 * deflated.std_error
    # the rest is the trace of P H P, P = I - V V^T
    v = torch.as_tensor(h.eigenpairs.eigenvectors).T
    projector = torch.eye(h.size, dtype=torch.float64) - v @ v.T
    rest = projector @ hessian @ projector
    assert abs(deflated.info["rest"] - float(rest.trace())) < 5 * deflated.std_error

    def hutchinson_error(matrix: torch.Tensor) -> float:  # of Rademacher probes: 2 (||A||_F^2 - sum A_ii^2)
        return float((2 * ((matrix**2).sum() - (matrix.diagonal() ** 2).sum()) / 40).sqrt())

    # the top eigenvalues are no longer in the variance; the reported errors are of the right size
    assert hutchinson_error(rest) < 0.8 * hutchinson_error(hessian)
    assert 0.5 < deflated.std_error / hutchinson_error(rest) < 2
    assert 0.5 < plain.std_error / hutchinson_error(hessian) < 2


def test_ggn_and_fisher_views_are_their_operators(problem):
    model, x, y, data, _, ggn = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    assert torch.allclose(h.ggn().dense(), ggn, rtol=1e-9, atol=1e-12)
    per_sample = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                                              list(model.parameters()))])
        for i in range(len(x))
    ])
    fisher = per_sample.T @ per_sample / len(x)
    assert torch.allclose(h.fisher().dense(), fisher, rtol=1e-9, atol=1e-12)
    assert Hessian(model, data, F.cross_entropy, curvature="ggn", verbose=False).curvature == "ggn"
    loop = h.fisher(per_sample="loop")  # options make a new view
    assert loop.operator.per_sample == "loop" and h.fisher(per_sample="loop") is loop
    assert h.fisher() is not loop and h.fisher().operator.per_sample != "loop"  # the view without options


def block_mask(model: nn.Module) -> torch.Tensor:
    """True on the diagonal blocks of each parameter tensor (the PCH's default block structure)."""
    sizes = [p.numel() for p in model.parameters()]
    owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return owner[:, None] == owner[None, :]


def test_pch_view_keeps_or_drops_the_residual_as_the_hessian_or_ggn_blocks(problem):
    model, _, _, data, hessian, ggn = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    mask = block_mask(model)
    assert torch.allclose(h.pch(residual="keep").dense(), hessian * mask, rtol=1e-9, atol=1e-12)
    assert torch.allclose(h.pch(residual="drop").dense(), ggn * mask, rtol=1e-9, atol=1e-12)
    pch = h.pch().dense()
    direct = PCHOperator(model, data, F.cross_entropy, use_gpu=False)
    assert torch.allclose(pch, direct.apply_block(torch.eye(direct.size, dtype=torch.float64)), rtol=1e-9, atol=1e-12)
    lowest = torch.linalg.eigvalsh(pch)
    assert lowest[0] >= -1e-12 * lowest[-1]  # positive semi-definite
    assert not torch.allclose(pch, hessian * mask, rtol=1e-3)  # the tanh residuals were made positive
    top = h.pch().eigenvalues(2, which="LA")
    assert np.allclose(top.eigenvalues, lowest.numpy()[::-1][:2], rtol=1e-8)


def test_options_reach_the_operator_and_views_take_what_their_class_takes(problem):
    model, _, _, data, hessian, _ = problem
    names = ["4.weight", "4.bias"]
    h = Hessian(model, data, F.cross_entropy, params=names, backend="double_backward", verbose=False)
    assert h.param_names == names and h.operator.backend == "double_backward"
    n = hessian.shape[0]
    block = hessian[n - h.size:, n - h.size:]  # "4" holds the last parameters
    assert torch.allclose(h.dense(), block, rtol=1e-9, atol=1e-12)
    assert h.ggn().param_names == names  # GGNOperator takes no backend: left out


def test_model_and_rng_are_left_as_they_were_also_on_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(16, 4)).double().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model[4].bias.requires_grad_(False)
    model[3].eval()
    x, y = classification_data(num=60)
    data = batches(x, y, [40, 20])
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    with Hessian(model, data, F.cross_entropy, verbose=False) as h:
        h.eigenvalues(2)
        h.trace(max_products=20)
        h.density(num_probes=2, num_steps=8)
        h.per_layer(curvatures=("hessian", "ggn"), max_products=20)
        h.landscape_1d(steps=3)
        h.landscape_2d(("random", "random"), steps=3)
    assert_model_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)

    calls = {"n": 0}

    def failing(outputs, targets):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return F.cross_entropy(outputs, targets)

    broken = Hessian(model, data, failing, reduction="mean", verbose=False)
    for call in (lambda: broken.eigenvalues(2), lambda: broken.landscape_1d(torch.ones(broken.size,
                                                                                       dtype=torch.float64))):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="boom"):
            with broken:
                call()
        assert_model_unchanged(model, before)
        assert torch.equal(torch.get_rng_state(), rng)


def test_bad_input_gets_clear_errors(problem):
    model, x, y, data, _, _ = problem
    loss = F.cross_entropy
    with pytest.raises(TypeError, match="both a dataloader and data"):
        Hessian(model, data, loss, data=(x, y))
    with pytest.raises(TypeError, match="needs the loss"):
        Hessian(model, data)
    with pytest.raises(TypeError, match="needs data"):
        Hessian(model, loss=loss)
    with pytest.raises(TypeError, match="one \\(inputs, targets\\) pair"):
        Hessian(model, loss, data=[(x, y), (x, y), (x, y)])
    with pytest.raises(TypeError, match="full_dataset"):
        Hessian(model, data, loss, full_dataset=False)
    with pytest.raises(TypeError, match="per_sample"):
        Hessian(model, data, loss, per_sample="loop")  # an option of the Fisher, not of HVPOperator
    with pytest.raises(ValueError, match="curvature="):
        Hessian(model, data, loss, curvature="hessain")
    h = Hessian(model, data, loss, verbose=False)
    with pytest.raises(ValueError, match="mode="):
        h.eigenvalues(2, mode="nope")
    with pytest.raises(TypeError, match="unknown keyword"):
        h.eigenvalues(2, tolerance=1e-3)
    with pytest.raises(ValueError, match="method="):
        h.trace("exact")
    with pytest.raises(TypeError, match="per_sample"):
        h.ggn(per_sample="loop")
    with pytest.raises(ValueError, match="call eigenvalues"):
        h.trace(deflate=True)
    with pytest.raises(TypeError, match="deflate must be True or False"):
        h.trace(deflate="yes")


def test_repr_and_attributes(problem):
    model, _, _, data, _, _ = problem
    h = Hessian(model, data, F.cross_entropy, verbose=False)
    assert "curvature='hessian'" in repr(h) and f"n={h.size}" in repr(h)
    assert h.model is model and h.loss is F.cross_entropy and h.verbose is False
    assert isinstance(h.ggn().operator, GGNOperator)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_of_a_cpu_model_gives_the_cpu_numbers(problem):
    model, _, _, data, _, _ = problem
    before = model_snapshot(model)
    loader = CountingLoader(data)
    cpu = Hessian(model, data, F.cross_entropy, use_gpu=False, verbose=False)
    with Hessian(model, loader, F.cross_entropy, use_gpu=True, verbose=False) as gpu:
        assert gpu.operator.device.type == "cuda"
        pairs = [h.eigenvalues(3, which="LA").eigenvalues for h in (gpu, cpu)]
        assert np.allclose(*pairs, rtol=1e-9)
        traces = [h.trace(max_products=30).estimate for h in (gpu, cpu)]
        assert traces[0] == pytest.approx(traces[1], rel=1e-9)
        tables = [h.per_layer(curvatures=("hessian", "ggn"), exact_max_size=100, max_products=30) for h in (gpu, cpu)]
        for a, b in zip(*tables):
            assert (a.top_eigenvalue, a.trace, a.frobenius) == pytest.approx((b.top_eigenvalue, b.trace, b.frobenius),
                                                                             rel=1e-8)
        surfaces = [h.landscape_2d((0, "random"), steps=3) for h in (gpu, cpu)]
        assert np.allclose(surfaces[0].losses, surfaces[1].losses, rtol=1e-10)
        assert surfaces[0].directions.device.type == "cuda"
    assert loader.iterations == 1
    assert_model_unchanged(model, before)
    assert all(p.device.type == "cpu" for p in model.parameters())
