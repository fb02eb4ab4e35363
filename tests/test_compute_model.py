"""The user's model is left exactly as it was, by every call, also when the call raises; and bad
input gets a clear error before torch gets to it."""

import math

import pytest
import torch
from torch import nn

from hessian_eigenthings import HVPOperator, NonFiniteError, compute_hessian_eigenthings
from helpers import assert_model_unchanged, classification_data, dense_loss_hessian, model_snapshot, small_mlp

F = nn.functional


def bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4)
    ).double()


def with_grads(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    return model


@pytest.fixture
def data():
    x, y = classification_data(num=96)
    return [(x[:64], y[:64]), (x[64:], y[64:])]


def test_eval_mode_default_is_deterministic_and_leaves_model_in_train_mode(data):
    model = with_grads(bn_dropout_model())
    model.train()
    model[3].eval()  # a mixed set of modes must come back exactly
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first, second = op.apply(v), op.apply(v)
    assert torch.equal(first, second)
    assert_model_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    # equals the exact Hessian of the model in eval mode
    x = torch.cat([b[0] for b in data]); y = torch.cat([b[1] for b in data])
    model.eval()
    exact = dense_loss_hessian(model, F.cross_entropy, x, y) @ v
    assert torch.allclose(first, exact, rtol=1e-9, atol=1e-12 * exact.abs().max())


def test_train_mode_opt_out_restores_batchnorm_statistics_and_rng(data):
    model = with_grads(bn_dropout_model()).train()
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False, eval_mode=False)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first, second = op.apply(v), op.apply(v)
    assert torch.equal(first, second)  # dropout masks come from a fixed private seed
    eval_op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    assert not torch.allclose(first, eval_op.apply(v))  # batch statistics and dropout do matter
    assert_model_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_solvers_leave_model_and_global_rng_untouched(data):
    model = with_grads(bn_dropout_model()).train()
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    for mode in ("power_iter", "lanczos"):
        compute_hessian_eigenthings(model, data, F.cross_entropy, 2, mode=mode, use_gpu=False, verbose=False)
    assert_model_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def _bad_calls(model, data):
    """(description, callable, expected exception, words the message must contain)."""
    x, y = data[0]
    nan_x = x.clone()
    nan_x[3, 2] = math.nan
    ok = dict(use_gpu=False, verbose=False)

    def one_shot():
        return (b for b in data)

    yield "k=0", lambda: compute_hessian_eigenthings(model, data, F.cross_entropy, 0, **ok), ValueError, ["num_eigenthings"]
    yield "k<0", lambda: compute_hessian_eigenthings(model, data, F.cross_entropy, -3, **ok), ValueError, ["num_eigenthings"]
    yield "k>=n", lambda: compute_hessian_eigenthings(model, data, F.cross_entropy, 10**6, **ok), ValueError, ["smaller than"]
    yield "k float", lambda: compute_hessian_eigenthings(model, data, F.cross_entropy, 2.0, **ok), TypeError, ["integer"]
    yield "mode", lambda: compute_hessian_eigenthings(model, data, F.cross_entropy, 2, mode="eig", **ok), ValueError, ["mode", "power_iter"]
    yield "which", lambda: compute_hessian_eigenthings(model, data, F.cross_entropy, 2, which="XX", **ok), ValueError, ["which", "LA"]
    yield "which lanczos", lambda: compute_hessian_eigenthings(model, data, F.cross_entropy, 2, mode="lanczos", which="BE", **ok), ValueError, ["which"]
    yield "kwarg", lambda: compute_hessian_eigenthings(model, data, F.cross_entropy, 2, stepz=3, **ok), TypeError, ["stepz"]
    yield "empty", lambda: compute_hessian_eigenthings(model, [], F.cross_entropy, 2, **ok), ValueError, ["empty"]
    yield "one-shot", lambda: HVPOperator(model, one_shot(), F.cross_entropy, use_gpu=False), ValueError, ["one-shot", "list"]
    yield "no batches", lambda: HVPOperator(model, _NoLenEmpty(), F.cross_entropy, use_gpu=False).apply(
        torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)), ValueError, ["no batches"]
    yield "not a pair", lambda: compute_hessian_eigenthings(model, [x], F.cross_entropy, 2, **ok), TypeError, ["(inputs, targets)"]
    yield "non-scalar loss", lambda: compute_hessian_eigenthings(
        model, data, lambda o, t: F.cross_entropy(o, t, reduction="none"), 2, **ok), ValueError, ["scalar", "reduction"]
    yield "float loss", lambda: compute_hessian_eigenthings(
        model, data, lambda o, t: F.cross_entropy(o, t).item(), 2, **ok), TypeError, ["scalar"]
    yield "detached loss", lambda: compute_hessian_eigenthings(
        model, data, lambda o, t: F.cross_entropy(o, t).detach(), 2, **ok), ValueError, ["grad_fn"]
    yield "nan loss", lambda: compute_hessian_eigenthings(
        model, [data[0], (nan_x, y)], F.cross_entropy, 2, **ok), NonFiniteError, ["batch 1", "nan"]
    yield "nan loss micro", lambda: compute_hessian_eigenthings(
        model, [(nan_x, y)], F.cross_entropy, 2, max_possible_gpu_samples=2, **ok), NonFiniteError, ["batch 0 (samples 2:4)"]
    yield "bad param name", lambda: HVPOperator(model, data, F.cross_entropy, params=["nope"]), ValueError, ["nope", "0.weight"]
    yield "not a model", lambda: HVPOperator(lambda x: x, data, F.cross_entropy), TypeError, ["nn.Module"]
    yield "bad micro", lambda: HVPOperator(model, data, F.cross_entropy, max_possible_gpu_samples=0), ValueError, ["max_possible_gpu_samples"]
    yield "bad device", lambda: HVPOperator(model, data, F.cross_entropy, device="warp9"), ValueError, ["device"]


class _NoLenEmpty:
    def __iter__(self):
        return iter(())


def test_bad_input_raises_clear_errors_and_leaves_model_unchanged(data):
    model = with_grads(bn_dropout_model()).train()
    before = model_snapshot(model)
    for description, call, exc, words in _bad_calls(model, data):
        with pytest.raises(exc) as info:
            call()
        for word in words:
            assert word in str(info.value), (description, str(info.value))
        assert_model_unchanged(model, before)


def test_non_finite_product_is_reported_with_its_batch():
    class Cusp(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def forward(self, x):
            return x * self.w.abs().pow(1.5).sum()

    model = Cusp()
    data = [(torch.ones(4, 1, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64))] * 2
    op = HVPOperator(model, data, lambda o, t: o.mean(), use_gpu=False)
    with pytest.raises(NonFiniteError, match="product of batch 0"):
        op.apply(torch.ones(3, dtype=torch.float64))


def test_model_without_trainable_parameters(data):
    model = small_mlp().requires_grad_(False)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        compute_hessian_eigenthings(model, data, F.cross_entropy, 2, use_gpu=False)
    assert_model_unchanged(model, before)


def test_apply_checks_size_dtype_and_device(data):
    model = small_mlp()
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    with pytest.raises(ValueError, match=f"n={op.size}"):
        op.apply(torch.zeros(op.size + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        op.apply(torch.zeros(op.size, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        op.apply(torch.zeros(op.size, dtype=torch.float32))
    with pytest.raises(ValueError, match="vec.to"):
        op.apply(torch.zeros(op.size, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        op.apply([0.0] * op.size)
    with pytest.raises(ValueError, match=r"\(n, b\)"):
        op.apply_block(torch.zeros(op.size + 2, 3, dtype=torch.float64))
    assert op.num_products == 0


def test_mixed_dtypes_are_refused(data):
    model = small_mlp()
    model[4].float()
    with pytest.raises(TypeError, match="mix dtypes"):
        HVPOperator(model, data, F.cross_entropy, use_gpu=False)


def test_frozen_parameter_chosen_explicitly_is_refused(data):
    model = small_mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        HVPOperator(model, data, F.cross_entropy, use_gpu=False, params=["0.weight"])
    assert model[0].weight.requires_grad is False


def test_deferred_checks_postpone_the_sync_but_still_name_the_batch(data, monkeypatch):
    from hessian_eigenthings.operators import finite

    model = small_mlp()
    x, y = data[1]
    bad_x = x.clone()
    bad_x[0, 0] = math.nan
    op = HVPOperator(model, [data[0], (bad_x, y)], F.cross_entropy, use_gpu=False)
    calls = []
    real = finite.raise_if_not_finite
    monkeypatch.setattr(finite, "raise_if_not_finite", lambda checks: (calls.append(len(checks)), real(checks))[1])
    v = torch.ones(op.size, dtype=torch.float64)
    with pytest.raises(NonFiniteError, match="batch 1"):
        with op.deferred_checks():
            for _ in range(3):
                op.apply(v)
            assert calls == []  # nothing read on the host yet
    assert calls == [6]  # one check of all three products' two batches
    good = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    with good.deferred_checks():
        good.apply(v)
        good.flush_checks()
        good.apply(v)
    assert good._checks.pending is None


def test_native_solver_reports_a_nan_product():
    from hessian_eigenthings import thick_restart_lanczos

    model = small_mlp()
    x, y = classification_data(num=64)
    x[5, 1] = math.nan
    op = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False)
    with pytest.raises(NonFiniteError, match="batch 0"):
        thick_restart_lanczos(op, 2, verbose=False)

def test_inf_in_an_input_is_reported_with_its_batch(data):
    # tanh saturates, so the loss stays finite while the product of that batch is not.
    model = with_grads(small_mlp()).train()
    before = model_snapshot(model)
    (x0, y0), (x1, y1) = data
    x1 = x1.clone()
    x1[4, 1] = math.inf
    op = HVPOperator(model, [(x0, y0), (x1, y1)], F.cross_entropy, use_gpu=False)
    with pytest.raises(NonFiniteError, match=r"product of batch 1 .*inputs may contain NaN/Inf"):
        op.apply(torch.ones(op.size, dtype=torch.float64))
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("option", ["use_gpu", "fp16", "full_dataset", "eval_mode", "check_finite",
                                    "cache_batches", "cache_graphs", "batched"])
def test_boolean_options_given_as_strings_are_refused(data, option):
    from hessian_eigenthings import hessian_trace

    model = small_mlp()
    with pytest.raises(TypeError, match=option):
        HVPOperator(model, data, F.cross_entropy, **{option: "False"})
    with pytest.raises(TypeError, match=option):
        hessian_trace(model, data, F.cross_entropy, **{option: "no"})
    assert HVPOperator(model, data, F.cross_entropy, **{"use_gpu": False, option: False}) is not None


def test_inside_inference_mode_the_error_names_it_and_the_model_is_untouched(data):
    model = with_grads(bn_dropout_model()).train()
    before = model_snapshot(model)
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    v = torch.ones(op.size, dtype=torch.float64)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"inference_mode\(\).*outside"):
            op.apply(v)
        with pytest.raises(RuntimeError, match=r"inference_mode\(\)"):
            compute_hessian_eigenthings(model, data, F.cross_entropy, 2, use_gpu=False, verbose=False)
    assert_model_unchanged(model, before)
    assert op.num_products == 0


def test_data_made_under_inference_mode_is_used_and_a_model_made_there_is_refused(data):
    model = small_mlp()
    x, y = classification_data(num=40)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()
    op = HVPOperator(model, [(x_inf, y_inf)], F.cross_entropy, use_gpu=False)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = dense_loss_hessian(model, F.cross_entropy, x, y) @ v
    assert torch.allclose(op.apply(v), exact, rtol=1e-10, atol=1e-12 * exact.abs().max())
    with torch.inference_mode():
        made_there = small_mlp()
    with pytest.raises(ValueError, match="inference_mode"):
        HVPOperator(made_there, data, F.cross_entropy, use_gpu=False)


def test_a_model_converted_or_given_new_parameters_after_the_operator_is_named(data):
    import copy

    model = small_mlp()
    op = HVPOperator(model, data, F.cross_entropy, use_gpu=False)
    v = torch.ones(op.size, dtype=torch.float64)
    op.apply(v)
    model.float()  # in place: the operator's parameters are now float32
    with pytest.raises(RuntimeError, match=r"float64 parameters on cpu.*'0.weight' is now torch.float32"):
        op.apply(v)
    model.double()
    op.apply(v)  # back as it was: fine again
    replaced = copy.deepcopy(model)
    op = HVPOperator(replaced, data, F.cross_entropy, use_gpu=False)
    replaced[2].weight = nn.Parameter(replaced[2].weight.detach().clone())
    with pytest.raises(RuntimeError, match="'2.weight' is no longer the tensor"):
        op.apply(v)
