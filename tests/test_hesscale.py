"""HesScale against exact Hessian diagonals (dense autograd Hessians in float64) and its layer rules
against brute-force Jacobians."""

import pytest
import torch
from torch import nn

from hessian_eigenthings import GGNOperator, dense_matrix, hessian_diagonal, hesscale_diagonal
from hessian_eigenthings.spectrum import hesscale as hs
from helpers import (
    assert_model_unchanged,
    batches,
    classification_data,
    dense_loss_hessian,
    model_snapshot,
)

F = nn.functional


def _regression_data(num=64, din=10, dout=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num, din, generator=gen, dtype=torch.float64), torch.randn(num, dout, generator=gen, dtype=torch.float64)


LINEAR_CASES = {
    "cross_entropy function": (lambda: nn.Sequential(nn.Linear(10, 4)), F.cross_entropy, "class"),
    "cross_entropy module, sum": (lambda: nn.Sequential(nn.Linear(10, 4)), nn.CrossEntropyLoss(reduction="sum"), "class"),
    "log_softmax + nll": (lambda: nn.Sequential(nn.Linear(10, 4), nn.LogSoftmax(dim=1)), nn.NLLLoss(), "class"),
    "mse module": (lambda: nn.Sequential(nn.Linear(10, 3)), nn.MSELoss(), "regression"),
    "mse module, sum": (lambda: nn.Sequential(nn.Linear(10, 3)), nn.MSELoss(reduction="sum"), "regression"),
    "quartic function (autograd)": (lambda: nn.Sequential(nn.Linear(10, 3)), lambda o, t: ((o - t) ** 4).mean(), "regression"),
    "flatten + linear, no bias": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(10, 4, bias=False)), F.cross_entropy, "class"),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_model_is_exact(case):
    build, criterion, kind = LINEAR_CASES[case]
    torch.manual_seed(1)
    model = build().double()
    x, y = classification_data(num=64, din=10, classes=4) if kind == "class" else _regression_data()
    loader = batches(x, y, [40, 17, 7])
    result = hesscale_diagonal(model, loader, criterion, max_possible_gpu_samples=16, verbose=False)
    truth = dense_loss_hessian(model, criterion, x, y).diagonal()
    assert result.method == "hesscale" and result.info["num_samples"] == 64
    assert torch.allclose(result.diagonal, truth, rtol=1e-10, atol=1e-14 * float(truth.abs().max()))
    assert set(result.info["by_parameter"]) == {n for n, _ in model.named_parameters()}


def test_sum_and_mean_differ_by_the_sample_count():
    model = nn.Sequential(nn.Linear(10, 4)).double()
    x, y = classification_data(num=64, din=10, classes=4)
    loader = batches(x, y, [40, 24])
    mean = hesscale_diagonal(model, loader, F.cross_entropy, verbose=False)
    summed = hesscale_diagonal(model, loader, lambda o, t: F.cross_entropy(o, t, reduction="sum"), verbose=False)
    assert mean.info["reduction"] == "mean" and summed.info["reduction"] == "sum"
    assert torch.allclose(summed.diagonal, 64 * mean.diagonal, rtol=1e-12)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU, nn.GELU])
def test_last_layer_block_is_exact(activation):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 12), activation(), nn.Linear(12, 12), activation(), nn.Linear(12, 4)).double()
    x, y = classification_data(num=64, din=10, classes=4)
    result = hesscale_diagonal(model, batches(x, y, [50, 14]), F.cross_entropy, verbose=False)
    truth = dense_loss_hessian(model, F.cross_entropy, x, y).diagonal()
    last = 12 * 4 + 4
    assert torch.allclose(result.diagonal[-last:], truth[-last:], rtol=1e-10, atol=1e-16)
    assert not torch.allclose(result.diagonal[:-last], truth[:-last], rtol=1e-3)  # an approximation below


def test_last_layer_exact_through_an_output_activation():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3), nn.Sigmoid()).double()
    x, y = _regression_data()
    y = torch.sigmoid(y)
    result = hesscale_diagonal(model, [(x, y)], nn.MSELoss(), verbose=False)
    truth = dense_loss_hessian(model, nn.MSELoss(), x, y).diagonal()
    last = 8 * 3 + 3
    assert torch.allclose(result.diagonal[-last:], truth[-last:], rtol=1e-10, atol=1e-16)


def _cnn():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding="same"), nn.Tanh()), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(24, 5),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(48, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (48,), generator=gen)
    return model.eval(), x, y  # eval: the dense reference must use the running statistics too


@pytest.fixture(scope="module")
def cnn_problem():
    model, x, y = _cnn()
    return model, x, y, dense_loss_hessian(model, F.cross_entropy, x, y).diagonal()


def test_last_layer_block_is_exact_for_a_cnn(cnn_problem):
    model, x, y, truth = cnn_problem
    result = hesscale_diagonal(model, batches(x, y, [30, 18]), F.cross_entropy, verbose=False)
    last = 24 * 5 + 5
    assert torch.allclose(result.diagonal[-last:], truth[-last:], rtol=1e-10, atol=1e-16)


def _relative_error(found, truth):
    return float((found - truth).norm() / truth.norm())


def test_measured_error_on_small_mlps_and_a_cnn(cnn_problem):
    # The numbers the documentation quotes; the bounds only catch a regression.
    errors = {}
    for activation in (nn.Tanh, nn.ReLU):
        torch.manual_seed(6)
        model = nn.Sequential(nn.Linear(10, 16), activation(), nn.Linear(16, 16), activation(), nn.Linear(16, 4)).double()
        x, y = classification_data(num=128, din=10, classes=4)
        found = hesscale_diagonal(model, [(x, y)], F.cross_entropy, verbose=False).diagonal
        errors[activation.__name__] = _relative_error(found, dense_loss_hessian(model, F.cross_entropy, x, y).diagonal())
    model, x, y, truth = cnn_problem
    found = hesscale_diagonal(model, [(x, y)], F.cross_entropy, verbose=False).diagonal
    errors["cnn"] = _relative_error(found, truth)
    assert errors["Tanh"] < 0.3 and errors["ReLU"] < 0.3 and errors["cnn"] < 0.6, errors


def test_ggn_variant_drops_the_activation_curvature():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    x, y = classification_data(num=64, din=10, classes=4)
    loader = [(x, y)]
    ggn = hesscale_diagonal(model, loader, F.cross_entropy, curvature="ggn", verbose=False)
    exact_ggn = dense_matrix(GGNOperator(model, loader, F.cross_entropy, use_gpu=False), verbose=False).diagonal()
    last = 8 * 4 + 4
    assert torch.allclose(ggn.diagonal[-last:], exact_ggn[-last:], rtol=1e-10)
    hessian = hesscale_diagonal(model, loader, F.cross_entropy, verbose=False)
    assert not torch.allclose(hessian.diagonal[:-last], ggn.diagonal[:-last], rtol=1e-3)
    relu = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    a = hesscale_diagonal(relu, loader, F.cross_entropy, curvature="ggn", verbose=False).diagonal
    b = hesscale_diagonal(relu, loader, F.cross_entropy, verbose=False).diagonal
    assert torch.allclose(a, b, rtol=1e-12)  # ReLU has no curvature


# -- each layer rule against brute-force Jacobians: sum_o J_oi^2 d_o (and the same for parameters) --

def _brute_input_diagonal(layer, x, d):
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda t: layer(t.unsqueeze(0))[0], x[b])
        jac = jac.reshape(d[b].numel(), x[b].numel())
        out[b] = ((jac**2) * d[b].reshape(-1, 1)).sum(dim=0).reshape(x[b].shape)
    return out


def _brute_parameter_diagonal(layer, name, x, d):
    from torch.func import functional_call

    param = dict(layer.named_parameters())[name]
    total = torch.zeros_like(param)
    for b in range(x.shape[0]):
        def f(p):
            return functional_call(layer, {name: p}, (x[b : b + 1],))[0]
        jac = torch.autograd.functional.jacobian(f, param.detach()).reshape(d[b].numel(), param.numel())
        total += ((jac**2) * d[b].reshape(-1, 1)).sum(dim=0).reshape(param.shape)
    return total


LAYERS = {
    "linear 3-d input": (lambda: nn.Linear(5, 3), (3, 4, 5)),
    "conv1d stride, dilation": (lambda: nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2), (2, 2, 9)),
    "conv2d groups": (lambda: nn.Conv2d(4, 6, (3, 2), padding=(1, 0), groups=2), (2, 4, 5, 5)),
    "conv2d same": (lambda: nn.Conv2d(2, 3, 3, padding="same", bias=False), (2, 2, 4, 4)),
    "conv3d": (lambda: nn.Conv3d(2, 2, 2, stride=(1, 2, 1)), (2, 2, 3, 4, 3)),
    "batchnorm2d eval": (lambda: nn.BatchNorm2d(3), (3, 3, 2, 2)),
    "batchnorm1d eval, no affine": (lambda: nn.BatchNorm1d(4, affine=False), (3, 4)),
    "maxpool2d overlapping, ceil": (lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 2, 6, 5)),
    "adaptive maxpool1d": (lambda: nn.AdaptiveMaxPool1d(3), (2, 2, 7)),
    "avgpool1d padded": (lambda: nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True), (2, 2, 8)),
    "avgpool2d no pad count": (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 2, 5, 6)),
    "avgpool2d divisor": (lambda: nn.AvgPool2d(2, divisor_override=3), (2, 2, 4, 4)),
    "avgpool3d": (lambda: nn.AvgPool3d(2, stride=1), (2, 1, 3, 3, 3)),
    "adaptive avgpool2d uneven": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 2, 5, 7)),
    "adaptive avgpool1d": (lambda: nn.AdaptiveAvgPool1d(4), (2, 3, 6)),
    "flatten": (lambda: nn.Flatten(), (2, 2, 3)),
    "unflatten": (lambda: nn.Unflatten(1, (2, 3)), (2, 6)),
    "dropout eval": (lambda: nn.Dropout(0.3), (2, 5)),
}


@pytest.mark.parametrize("case", list(LAYERS))
def test_linear_layer_rules_match_brute_force(case):
    build, shape = LAYERS[case]
    torch.manual_seed(8)
    layer = build().double().eval()
    if isinstance(layer, hs.BATCHNORMS):
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
            if layer.weight is not None:
                layer.weight.uniform_(0.5, 2)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    d = torch.rand(layer(x).shape, generator=gen, dtype=torch.float64) - 0.3  # any sign
    found = hs._input_diagonal(layer, x, d, None, case)
    assert torch.allclose(found, _brute_input_diagonal(layer, x, d), rtol=1e-10, atol=1e-12)
    for name, _ in layer.named_parameters():
        got = hs._parameter_diagonal(layer, name, x, d)
        assert torch.allclose(got, _brute_parameter_diagonal(layer, name, x, d), rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("activation, first, second", [
    (nn.Tanh(), lambda x: 1 - torch.tanh(x) ** 2, lambda x: -2 * torch.tanh(x) * (1 - torch.tanh(x) ** 2)),
    (nn.Sigmoid(), lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)),
     lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)) * (1 - 2 * torch.sigmoid(x))),
    (nn.Softplus(), torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x))),
    (nn.ReLU(inplace=True), lambda x: (x > 0).double(), lambda x: torch.zeros_like(x)),
    (nn.LeakyReLU(0.1), lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, 0.1)), torch.zeros_like),
])
def test_elementwise_rule(activation, first, second):
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    d = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    before = x.clone()
    found = hs._input_diagonal(activation, x, d, g, "act")
    assert torch.equal(x, before)  # an in-place activation must not overwrite the recorded input
    assert torch.allclose(found, first(x) ** 2 * d + second(x) * g, rtol=1e-12, atol=1e-14)


def test_nested_sequential_and_params_subset():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Sequential(nn.Linear(10, 6), nn.Tanh()), nn.Sequential(nn.Linear(6, 4))).double()
    x, y = classification_data(num=32, din=10, classes=4)
    full = hesscale_diagonal(model, [(x, y)], F.cross_entropy, verbose=False)
    part = hesscale_diagonal(model, [(x, y)], F.cross_entropy, params=["0.0.weight", "1.0.bias"], verbose=False)
    assert set(part.info["by_parameter"]) == {"0.0.weight", "1.0.bias"}
    for name, value in part.info["by_parameter"].items():
        assert torch.allclose(value, full.info["by_parameter"][name], rtol=1e-12)


@pytest.mark.parametrize("model, match", [
    (lambda: nn.Sequential(nn.Linear(10, 4), nn.Sequential(nn.Identity(), nn.LayerNorm(4))), r"'1\.1' \(LayerNorm\)"),
    (lambda: nn.ModuleList([nn.Linear(10, 4)]), "nn.Sequential"),
    (lambda: nn.Sequential(nn.Linear(10, 4), nn.Softmax(dim=1), nn.Linear(4, 4)), "only supported at the end"),
    (lambda: nn.Sequential(nn.Conv1d(1, 1, 2, padding_mode="circular", padding=1), nn.Flatten()), "circular"),
])
def test_unsupported_models_are_refused_by_name(model, match):
    built = model().double()
    x = torch.randn(8, 10, dtype=torch.float64)
    if isinstance(built, nn.Sequential) and isinstance(built[0], nn.Conv1d):
        x = x.unsqueeze(1)
    y = torch.randint(0, 4, (8,))
    before = model_snapshot(built) if isinstance(built, nn.Module) else None
    with pytest.raises(ValueError, match=match):
        hesscale_diagonal(built, [(x, y)], F.cross_entropy, verbose=False)
    assert_model_unchanged(built, before)


def test_training_mode_batchnorm_is_refused_and_the_model_left_alone():
    model, x, y = _cnn()
    model.train()
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="BatchNorm layer '1'"):
        hesscale_diagonal(model, [(x, y)], F.cross_entropy, eval_mode=False, verbose=False)
    assert_model_unchanged(model, before)


def test_model_and_random_state_unchanged():
    model, x, y = _cnn()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = model_snapshot(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    state = torch.get_rng_state()
    hesscale_diagonal(model, loader, F.cross_entropy, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert_model_unchanged(model, before)
    assert model.training


def test_hessian_diagonal_method_hesscale():
    model, x, y = _cnn()
    result = hessian_diagonal(model, [(x[:20], y[:20]), (x[20:], y[20:])], F.cross_entropy, method="hesscale",
                              verbose=False, use_gpu=False)
    direct = hesscale_diagonal(model, [(x, y)], F.cross_entropy, verbose=False)
    assert torch.allclose(result.diagonal, direct.diagonal, rtol=1e-10)
    assert torch.isnan(result.std_error).all() and result.converged
    assert result.info["by_parameter"]["7.weight"].shape == (5, 24)
    with pytest.raises(TypeError, match="cache_graphs"):
        hessian_diagonal(model, [(x, y)], F.cross_entropy, method="hesscale", cache_graphs=False)
    with pytest.raises(ValueError, match="full_dataset"):
        hessian_diagonal(model, [(x, y)], F.cross_entropy, method="hesscale", full_dataset=False)
    with pytest.raises(ValueError, match="contradicts"):
        hessian_diagonal(model, [(x, y)], F.cross_entropy, True, method="hesscale")
    with pytest.raises(ValueError, match="not known"):
        hessian_diagonal(model, [(x, y)], F.cross_entropy, method="bl89")
    with pytest.raises(ValueError, match="fisher"):
        hessian_diagonal(model, [(x, y)], F.cross_entropy, method="hesscale", curvature="fisher")
