"""The exact and Monte-Carlo GGN diagonals against the diagonal of the dense GGN
(``dense_matrix(GGNOperator(...))``) in float64."""

import copy

import pytest
import torch
from torch import nn

from hessian_eigenthings import GGNOperator, dense_matrix, ggn_diagonal, hessian_diagonal
from helpers import assert_model_unchanged, batches, classification_data, model_snapshot, small_mlp

F = nn.functional


def _dense_ggn_diagonal(model, loader, criterion):
    """The diagonal of the dense GGN of the loss of all samples as one batch (so that a summing loss
    gives the sum over every sample whatever the operators do with batches)."""
    x = torch.cat([inputs for inputs, _ in loader])
    y = torch.cat([targets for _, targets in loader])
    op = GGNOperator(model, [(x, y)], criterion, use_gpu=False, max_possible_gpu_samples=len(x))
    return dense_matrix(op, verbose=False).diagonal()


def _regression(num=48, din=10, dout=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num, din, generator=gen, dtype=torch.float64), torch.randn(num, dout, generator=gen, dtype=torch.float64)


class Residual(nn.Module):
    """Not a Sequential: a skip connection, a layer used twice (shared weights) and a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 8)
        self.block = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.relu(self.block(h))
        h = self.norm(h + torch.sigmoid(self.block(h)))
        return self.out(h)


class Bag(nn.Module):
    """Token ids -> embedding -> mean over the sequence -> linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, tokens):
        return self.head(self.embed(tokens).mean(dim=1))


def _cnn():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.ConvTranspose2d(3, 2, 2, stride=1), nn.GroupNorm(1, 2), nn.Tanh(), nn.Flatten(), nn.Linear(50, 4),
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 1, 8, 8, generator=gen, dtype=torch.float64)
    return model.eval(), x, torch.randint(0, 4, (40,), generator=gen)


CASES = {
    "mlp, cross_entropy function": lambda: (small_mlp(), *classification_data(num=48), F.cross_entropy),
    "mlp, cross_entropy sum + ignore_index + smoothing": lambda: (
        small_mlp(), *_ignored(classification_data(num=48)),
        nn.CrossEntropyLoss(reduction="sum", ignore_index=-100, label_smoothing=0.1)),
    "mlp, mse": lambda: (small_mlp(dout=3), *_regression(), nn.MSELoss()),
    "mlp, quartic (autograd, indefinite-free)": lambda: (small_mlp(dout=3), *_regression(), lambda o, t: ((o - t) ** 4).mean()),
    "mlp, non-convex loss (signed factor)": lambda: (small_mlp(dout=3), *_regression(), lambda o, t: torch.cos(o - t).sum()),
    "cnn: conv, batchnorm, pooling, conv-transpose, groupnorm": lambda: (*_cnn(), F.cross_entropy),
    "residual model with a shared layer": lambda: (_seeded(Residual), *classification_data(num=48), F.cross_entropy),
    "embedding": lambda: (_seeded(Bag), torch.randint(0, 12, (48, 6), generator=torch.Generator().manual_seed(5)),
                          torch.randint(0, 4, (48,), generator=torch.Generator().manual_seed(6)), F.cross_entropy),
}


def _seeded(cls):
    torch.manual_seed(7)
    return cls().double()


def _ignored(data):
    x, y = data
    y = y.clone()
    y[::5] = -100
    return x, y


@pytest.mark.parametrize("case", list(CASES))
def test_exact_ggn_diagonal_matches_the_dense_ggn(case):
    model, x, y, criterion = CASES[case]()
    loader = batches(x, y, [25, 15, len(x) - 40])
    result = ggn_diagonal(model, loader, criterion, max_possible_gpu_samples=10, verbose=False)
    truth = _dense_ggn_diagonal(model, loader, criterion)
    assert result.method == "ggn_exact" and torch.all(result.std_error == 0)
    assert torch.allclose(result.diagonal, truth, rtol=1e-9, atol=1e-13 * float(truth.abs().max()))
    assert result.info["num_samples"] == len(x)


def test_params_subset_and_by_parameter():
    model, x, y, criterion = CASES["residual model with a shared layer"]()
    full = ggn_diagonal(model, [(x, y)], criterion, verbose=False)
    part = ggn_diagonal(model, [(x, y)], criterion, params=["block", "out.bias"], verbose=False)
    assert list(part.info["by_parameter"]) == ["block.weight", "block.bias", "out.bias"]
    for name, value in part.info["by_parameter"].items():
        assert torch.allclose(value, full.info["by_parameter"][name], rtol=1e-12)


@pytest.mark.parametrize("criterion", [nn.CrossEntropyLoss(), lambda o, t: ((o - F.one_hot(t, 4)) ** 2).sum()])
def test_monte_carlo_is_unbiased_within_its_standard_error(criterion):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x, y = classification_data(num=32, din=10, classes=4)
    loader = batches(x, y, [20, 12])
    truth = _dense_ggn_diagonal(model, loader, criterion)
    result = ggn_diagonal(model, loader, criterion, mc_samples=300, seed=1, verbose=False)
    assert result.method == "ggn_mc" and result.num_probes == 300
    z = (result.diagonal - truth) / result.std_error
    assert float((z.abs() < 3).double().mean()) > 0.97 and float(z.abs().max()) < 5
    # the standard error falls like 1 / sqrt(draws), and the estimate is not exact
    assert 0 < float((result.diagonal - truth).abs().max()) < 0.2 * float(truth.abs().max())


def test_single_draws_average_to_the_exact_diagonal_over_seeds():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = classification_data(num=8, din=5, classes=3)
    truth = _dense_ggn_diagonal(model, [(x, y)], F.cross_entropy)
    draws = torch.stack([
        hessian_diagonal(model, [(x, y)], F.cross_entropy, method="ggn_mc", seed=seed, verbose=False, use_gpu=False).diagonal
        for seed in range(400)
    ])
    single = ggn_diagonal(model, [(x, y)], F.cross_entropy, mc_samples=1, seed=0, verbose=False)
    assert torch.isinf(single.std_error).all() and torch.equal(single.diagonal, draws[0])
    assert not torch.equal(draws[0], draws[1])
    standard_error = draws.std(dim=0) / 400**0.5
    assert float(((draws.mean(dim=0) - truth).abs() / standard_error).max()) < 4.5


def test_monte_carlo_needs_a_convex_loss():
    model = small_mlp(dout=3)
    x, y = _regression()
    with pytest.raises(ValueError, match="not convex"):
        ggn_diagonal(model, [(x, y)], lambda o, t: torch.cos(o - t).sum(), mc_samples=2, verbose=False)


def test_hessian_diagonal_methods_route_to_the_ggn():
    model, x, y, criterion = CASES["mlp, cross_entropy function"]()
    loader = batches(x, y, [30, 18])
    exact = hessian_diagonal(model, loader, criterion, method="ggn_exact", curvature="ggn", verbose=False)
    assert torch.allclose(exact.diagonal, _dense_ggn_diagonal(model, loader, criterion), rtol=1e-9)
    assert exact.info["by_parameter"]["4.bias"].shape == (4,)
    mc = hessian_diagonal(model, loader, criterion, method="ggn_mc", mc_samples=4, seed=3, verbose=False)
    assert mc.num_probes == 4 and torch.isfinite(mc.std_error).all()
    with pytest.raises(TypeError, match="mc_samples"):
        hessian_diagonal(model, loader, criterion, method="ggn_exact", mc_samples=3)
    with pytest.raises(ValueError, match="contradicts"):
        hessian_diagonal(model, loader, criterion, method="ggn_exact", curvature="fisher")


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, dtype=torch.float64))
        self.lin = nn.Linear(10, 4).double()

    def forward(self, x):
        return self.lin(x) * self.scale


class TokenMajor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(10, 4).double()

    def forward(self, x):
        return self.lin(x.T.T.unsqueeze(0)).squeeze(0)


@pytest.mark.parametrize("model, inputs, match", [
    (Custom, None, r"layer 'Custom' \(Custom\) owns parameters"),
    (lambda: nn.Sequential(nn.Linear(10, 4), nn.LSTM(4, 4)).double(), None, r"'1' \(LSTM\)"),
    (TokenMajor, None, "first dimension"),
])
def test_unsupported_models_are_refused_by_name(model, inputs, match):
    built = model()
    x, y = classification_data(num=16, din=10, classes=4)
    before = model_snapshot(built)
    with pytest.raises(ValueError, match=match):
        ggn_diagonal(built, [(x, y)], F.cross_entropy, verbose=False)
    assert_model_unchanged(built, before)
    assert not any(m._forward_hooks for m in built.modules())


def test_tied_weights_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    model[2].weight = model[0].weight
    x, y = classification_data(num=16, din=4, classes=4)
    with pytest.raises(ValueError, match="tied weights"):
        ggn_diagonal(model, [(x, y)], F.cross_entropy, verbose=False)


def test_model_and_random_state_unchanged_also_on_error():
    model, x, y = _cnn()
    model.train()
    model[0].weight.grad = torch.zeros_like(model[0].weight)
    before = model_snapshot(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    state = torch.get_rng_state()
    ggn_diagonal(model, loader, F.cross_entropy, mc_samples=2, seed=None, verbose=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert_model_unchanged(model, before)
    with pytest.raises(ValueError, match="BatchNorm"):
        ggn_diagonal(model, loader, F.cross_entropy, eval_mode=False, verbose=False)
    assert_model_unchanged(model, before)
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["hesscale", "ggn_exact", "ggn_mc"])
def test_cuda_matches_cpu(method):
    model, x, y = _cnn()
    loader = batches(x, y, [25, 15])
    options = dict(method=method, verbose=False, seed=0) if method == "ggn_mc" else dict(method=method, verbose=False)
    cpu = hessian_diagonal(model, loader, F.cross_entropy, use_gpu=False, **options)
    gpu_model = copy.deepcopy(model).cuda()
    gpu = hessian_diagonal(gpu_model, loader, F.cross_entropy, **options)
    assert gpu.diagonal.device.type == "cuda"
    if method == "ggn_mc":  # the draws come from the same CPU generator
        assert torch.allclose(gpu.diagonal.cpu(), cpu.diagonal, rtol=1e-8, atol=1e-12)
    else:
        assert torch.allclose(gpu.diagonal.cpu(), cpu.diagonal, rtol=1e-9, atol=1e-14)
    on_copy = hessian_diagonal(model, loader, F.cross_entropy, use_gpu=True, **options)  # CPU model, CUDA copy
    assert on_copy.diagonal.device.type == "cuda" and all(p.device.type == "cpu" for p in model.parameters())
