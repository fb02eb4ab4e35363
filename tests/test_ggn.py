"""GGN and empirical Fisher operators against closed forms and explicit Jacobian references.

Known relations: for a model linear in its parameters the GGN is the Hessian (least squares,
logistic and softmax regression); for a nonlinear model the Hessian is the GGN plus the residual
term ``sum_{i,k} dL/df_ik * d^2 f_ik / dtheta^2``, computed here from the output Hessian.
"""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from hessian_eigenthings import (
    EmpiricalFisherOperator,
    GGNOperator,
    HVPOperator,
    dense_eigenthings,
    dense_matrix,
    hutchpp_trace,
    lanczos,
    loss_hessian,
    output_hessian,
)
from helpers import assert_model_unchanged, batches, classification_data, dense_loss_hessian, model_snapshot

F = nn.functional


def dense(op):
    return dense_matrix(op, verbose=False)


def tiny_mlp(seed=0, din=4, width=6, dout=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, width), nn.Tanh(), nn.Linear(width, dout)).double()


def regression_data(num, din, dout, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num, din, generator=gen, dtype=torch.float64), torch.randn(num, dout, generator=gen, dtype=torch.float64)


def test_least_squares_ggn_is_the_hessian_and_the_closed_form():
    x, y = regression_data(90, 5, 1, seed=1)
    model = nn.Linear(5, 1).double()
    loader = batches(x, y, [40, 40, 10])
    ggn = dense(GGNOperator(model, loader, F.mse_loss, use_gpu=False, max_possible_gpu_samples=16))
    design = torch.cat([x, torch.ones(90, 1, dtype=torch.float64)], dim=1)
    assert torch.allclose(ggn, 2 * design.T @ design / 90, rtol=1e-12, atol=1e-13)
    # multi-output least squares: GGN == Hessian as well
    x, y = regression_data(60, 4, 3, seed=2)
    model = nn.Linear(4, 3).double()
    ggn = dense(GGNOperator(model, batches(x, y, [50, 10]), F.mse_loss, use_gpu=False))
    assert torch.allclose(ggn, dense_loss_hessian(model, F.mse_loss, x, y), rtol=1e-11, atol=1e-13)


def test_logistic_and_softmax_regression_ggn_is_the_hessian():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(80, 4, generator=gen, dtype=torch.float64)
    y = (torch.rand(80, 1, generator=gen) > 0.5).double()
    model = nn.Linear(4, 1).double()
    ggn = dense(GGNOperator(model, batches(x, y, [64, 16]), F.binary_cross_entropy_with_logits, use_gpu=False))
    design = torch.cat([x, torch.ones(80, 1, dtype=torch.float64)], dim=1)
    p = torch.sigmoid(model(x)).detach().squeeze(1)
    assert torch.allclose(ggn, (design * (p * (1 - p))[:, None]).T @ design / 80, rtol=1e-11, atol=1e-13)
    x, y = classification_data(num=70, din=4, classes=3, seed=4)
    model = nn.Linear(4, 3).double()
    ggn = dense(GGNOperator(model, batches(x, y, [35, 35]), F.cross_entropy, use_gpu=False))
    assert torch.allclose(ggn, dense_loss_hessian(model, F.cross_entropy, x, y), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_nonlinear_hessian_is_ggn_plus_the_residual_term(loss_name):
    model = tiny_mlp(5)
    if loss_name == "mse":
        criterion = F.mse_loss
        x, y = regression_data(24, 4, 3, seed=6)
    else:
        criterion = F.cross_entropy
        x, y = classification_data(num=24, din=4, classes=3, seed=6)
    loader = batches(x, y, [16, 8])
    hessian = dense_loss_hessian(model, criterion, x, y)
    ggn = dense(GGNOperator(model, loader, criterion, use_gpu=False))
    outputs = model(x)
    dl_df = torch.autograd.grad(criterion(outputs, y), outputs)[0]  # (24, 3), includes the 1/N
    residual = torch.einsum("ik,ikab->ab", dl_df, output_hessian(model, x))
    assert torch.allclose(hessian, ggn + residual, rtol=1e-10, atol=1e-12)
    assert residual.norm() > 1e-2 * hessian.norm()  # the two really differ here
    # the GGN is PSD (convex loss in the outputs), the Hessian is not
    assert torch.linalg.eigvalsh(ggn).min() > -1e-12 * torch.linalg.eigvalsh(ggn).max()
    assert torch.linalg.eigvalsh(hessian).min() < -1e-4


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 5)
        self.b = nn.Linear(2, 5, bias=False)
        self.head = nn.Linear(5, 2)
        self.energy = nn.Linear(5, 1)

    def forward(self, x, z):
        h = torch.tanh(self.a(x) + self.b(z))
        return self.head(h), {"energy": self.energy(h).squeeze(-1)}


def two_head_loss(outputs, targets):
    logits, extra = outputs
    labels, energies = targets
    # couples both outputs, so H_out is not block diagonal
    return F.cross_entropy(logits, labels) + ((extra["energy"] - energies) ** 2 * logits[:, 0].sigmoid()).mean()


def test_ggn_with_several_inputs_and_outputs_matches_explicit_jacobian_product():
    torch.manual_seed(7)
    model = TwoInTwoOut().double()
    gen = torch.Generator().manual_seed(8)
    num = 20
    x = torch.randn(num, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(num, 2, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 2, (num,), generator=gen)
    energies = torch.randn(num, generator=gen, dtype=torch.float64)
    loader = [((x[:12], z[:12]), (labels[:12], energies[:12])), ((x[12:], z[12:]), (labels[12:], energies[12:]))]
    got = dense(GGNOperator(model, loader, two_head_loss, use_gpu=False))

    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def outputs_flat(flat, xb, zb):
        pieces, start = {}, 0
        for name, p in zip(names, params):
            pieces[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        logits, extra = functional_call(model, pieces, (xb, zb))
        return torch.cat([logits.reshape(-1), extra["energy"]])

    reference = torch.zeros_like(got)
    for (xb, zb), (lb, eb) in loader:
        jac = torch.autograd.functional.jacobian(lambda f: outputs_flat(f, xb, zb), flat0)  # (3B, n)
        b = len(lb)

        def loss_of_outputs(o):
            return two_head_loss((o[: 2 * b].view(b, 2), {"energy": o[2 * b :]}), (lb, eb))

        h_out = torch.autograd.functional.hessian(loss_of_outputs, outputs_flat(flat0, xb, zb).detach())
        reference += jac.T @ h_out @ jac * b / num  # batches weighted by their size
    assert torch.allclose(got, reference, rtol=1e-10, atol=1e-12)


def test_batched_and_column_by_column_products_agree_and_micro_batching_is_exact():
    model = tiny_mlp(9)
    x, y = classification_data(num=50, din=4, classes=3, seed=9)
    loader = batches(x, y, [30, 20])
    block = torch.randn(51, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batched = GGNOperator(model, loader, F.cross_entropy, use_gpu=False)
    first = batched.apply_block(block)
    assert batched._batched is True
    single = GGNOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=7)
    single._batched = False
    assert torch.allclose(single.apply_block(block), first, rtol=1e-11, atol=1e-13)
    assert torch.allclose(batched.apply(block[:, 2]), first[:, 2], rtol=1e-12, atol=1e-14)


def reference_fisher(model, criterion, x, y):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        g = torch.autograd.grad(criterion(model(x[i : i + 1]), y[i : i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    grads = torch.stack(rows)
    return grads.T @ grads / len(x), grads


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
def test_empirical_fisher_matches_mean_of_gradient_outer_products(per_sample):
    model = tiny_mlp(10)
    x, y = classification_data(num=40, din=4, classes=3, seed=10)
    reference, grads = reference_fisher(model, F.cross_entropy, x, y)
    op = EmpiricalFisherOperator(model, batches(x, y, [25, 15]), F.cross_entropy, use_gpu=False,
                                 max_possible_gpu_samples=9, per_sample=per_sample)
    fisher = dense(op)
    assert op.per_sample == per_sample
    assert torch.allclose(fisher, reference, rtol=1e-11, atol=1e-13)
    # its trace is the mean squared per-sample gradient norm; Hutch++ finds it within its error
    exact = float(grads.pow(2).sum(dim=1).mean())
    assert float(fisher.trace()) == pytest.approx(exact, rel=1e-11)
    est = hutchpp_trace(op, max_products=45, verbose=False)
    assert abs(est.estimate - exact) < 4 * est.std_error + 1e-9


class KeywordModel(nn.Module):
    """Takes its inputs by keyword, one of them a nested (tuple of mappings of lists) structure."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(2, 5)
        self.out = nn.Linear(5, 2)

    def forward(self, x, extra):
        scale, pieces = extra
        return self.out(torch.tanh(self.a(x) + self.b(pieces["z"][0]) * scale["s"]))


def keyword_problem(container):
    from collections import UserDict

    gen = torch.Generator().manual_seed(14)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    s = torch.rand(30, 1, generator=gen, dtype=torch.float64) + 0.5
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)

    def inputs(i, j):
        return container({"x": x[i:j], "extra": (UserDict({"s": s[i:j]}), {"z": [z[i:j]]})})

    def targets(i, j):
        return UserDict({"y": y[i:j]})

    return (x, z, s, y), [(inputs(0, 18), targets(0, 18)), (inputs(18, 30), targets(18, 30))]


def mse_of_mapping(out, t):
    assert type(t).__name__ == "UserDict"  # the loss gets the user's own container type
    return F.mse_loss(out, t["y"])


@pytest.mark.parametrize("per_sample", ["vmap", "loop"])
@pytest.mark.parametrize("container", ["UserDict", "dict"])
def test_empirical_fisher_splits_mapping_and_nested_inputs_per_sample(per_sample, container):
    from collections import UserDict

    torch.manual_seed(14)
    model = KeywordModel().double()
    (x, z, s, y), loader = keyword_problem(UserDict if container == "UserDict" else dict)
    params = list(model.parameters())
    rows = []
    for i in range(30):
        out = model(x[i : i + 1], ({"s": s[i : i + 1]}, {"z": [z[i : i + 1]]}))
        g = torch.autograd.grad(F.mse_loss(out, y[i : i + 1]), params)
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    grads = torch.stack(rows)
    reference = grads.T @ grads / 30
    op = EmpiricalFisherOperator(model, loader, mse_of_mapping, use_gpu=False, per_sample=per_sample,
                                 max_possible_gpu_samples=7)
    assert torch.allclose(dense(op), reference, rtol=1e-11, atol=1e-13)
    assert op.per_sample == per_sample  # vmap handled the mappings itself, without falling back
    # the Hessian of the same data matches the dense Hessian of the whole dataset
    hvp = HVPOperator(model, loader, mse_of_mapping, use_gpu=False, max_possible_gpu_samples=7)
    names = [n for n, _ in model.named_parameters()]

    def loss_of(flat):
        pieces, start = {}, 0
        for name, p in zip(names, params):
            pieces[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        out = functional_call(model, pieces, (x, ({"s": s}, {"z": [z]})))
        return F.mse_loss(out, y)

    flat0 = torch.cat([p.detach().reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss_of, flat0)
    assert torch.allclose(dense(hvp), hessian, rtol=1e-10, atol=1e-12)


class ItemModel(nn.Module):
    """A forward pass that calls .item(), which torch.func cannot vectorise."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * (1.0 + 0.0 * float(x.sum().item()))


def test_fisher_falls_back_to_the_per_sample_loop():
    torch.manual_seed(11)
    model = ItemModel().double()
    x, y = classification_data(num=12, din=4, classes=3, seed=11)
    reference, _ = reference_fisher(model, F.cross_entropy, x, y)
    auto = EmpiricalFisherOperator(model, [(x, y)], F.cross_entropy, use_gpu=False)
    assert torch.allclose(dense(auto), reference, rtol=1e-11, atol=1e-13)
    assert auto.per_sample == "loop"
    strict = EmpiricalFisherOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, per_sample="vmap")
    with pytest.raises(Exception):
        strict.apply(torch.ones(15, dtype=torch.float64))
    with pytest.raises(ValueError, match="per_sample"):
        EmpiricalFisherOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, per_sample="fast")


@pytest.mark.parametrize("operator_class", [HVPOperator, GGNOperator, EmpiricalFisherOperator])
def test_parameter_blocks_are_blocks_of_the_full_operator(operator_class):
    model = tiny_mlp(12)
    x, y = classification_data(num=30, din=4, classes=3, seed=12)
    loader = batches(x, y, [20, 10])
    full = dense(operator_class(model, loader, F.cross_entropy, use_gpu=False))
    layer = operator_class(model, loader, F.cross_entropy, use_gpu=False, params=["2"])
    assert layer.size == 21 and layer.param_names == ["2.weight", "2.bias"]
    assert torch.allclose(dense(layer), full[30:, 30:], rtol=1e-11, atol=1e-13)
    mixed = operator_class(model, loader, F.cross_entropy, use_gpu=False, params=["0.bias", "2.bias"])
    idx = torch.cat([torch.arange(24, 30), torch.arange(48, 51)])
    assert torch.allclose(dense(mixed), full[idx][:, idx], rtol=1e-11, atol=1e-13)


def test_solvers_work_on_the_ggn():
    model = tiny_mlp(13, width=10)
    x, y = classification_data(num=60, din=4, classes=3, seed=13)
    op = GGNOperator(model, batches(x, y, [40, 20]), F.cross_entropy, use_gpu=False)
    exact = dense_eigenthings(op, num_eigenthings=3, which="LA", verbose=False)
    found = lanczos(op, num_eigenthings=3, which="LA", tol=1e-10, verbose=False)
    assert np.allclose(found.eigenvalues, exact.eigenvalues, rtol=1e-8)
    assert found.converged.all()


def test_model_is_left_unchanged_in_train_mode_with_dropout():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    x, y = classification_data(num=20, din=4, classes=3, seed=14)
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    v = torch.randn(67, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cls in (GGNOperator, EmpiricalFisherOperator):
        for eval_mode in (True, False):
            op = cls(model, [(x, y)], F.cross_entropy, use_gpu=False, eval_mode=eval_mode)
            first, second = op.apply(v), op.apply(v)
            assert torch.equal(first, second)  # deterministic, also with dropout on
            assert_model_unchanged(model, before)
            assert torch.equal(torch.get_rng_state(), rng)
    # in eval mode the GGN is that of the model without dropout
    model.eval()
    ggn = dense(GGNOperator(model, [(x, y)], F.cross_entropy, use_gpu=False))
    outputs = model(x)
    dl_df = torch.autograd.grad(F.cross_entropy(outputs, y), outputs)[0]
    residual = torch.einsum("ik,ikab->ab", dl_df, output_hessian(model, x))
    hessian = loss_hessian(model, [(x, y)], F.cross_entropy, use_gpu=False, verbose=False)
    assert torch.allclose(hessian, ggn + residual, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
def test_ggn_and_fisher_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_mlp(15)
    x, y = classification_data(num=40, din=4, classes=3, seed=15)
    v = torch.randn(51, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for cls in (GGNOperator, EmpiricalFisherOperator):
        cpu = cls(model, [(x, y)], F.cross_entropy, use_gpu=False).apply(v)
        gpu_op = cls(model, [(x, y)], F.cross_entropy, use_gpu=True)
        assert gpu_op.device.type == "cuda"
        assert torch.allclose(gpu_op.apply(v.cuda()).cpu(), cpu, rtol=1e-10, atol=1e-12)


def recording_cross_entropy(seen, device_type):
    """cross_entropy that notes the autocast state it runs under (the products' arithmetic precision)."""

    def criterion(outputs, targets):
        enabled = torch.is_autocast_enabled(device_type)
        seen.add(torch.get_autocast_dtype(device_type) if enabled else None)
        return F.cross_entropy(outputs.double(), targets)

    return criterion


def check_precision_modes(device):
    """Each precision mode runs the GGN and Fisher products under that mode's autocast dtype, as
    HVPOperator does (bf16 is bfloat16 on every device; fp16 is float16 on CUDA, bfloat16 on the CPU)."""
    model = tiny_mlp(16).float().to(device)
    x, y = classification_data(num=12, din=4, classes=3, seed=16)
    loader = [(x.float().to(device), y.to(device))]
    expected = {"exact": None, "bf16": torch.bfloat16,
                "fp16": torch.float16 if device.type == "cuda" else torch.bfloat16}
    for cls in (GGNOperator, EmpiricalFisherOperator):
        for precision, dtype in expected.items():
            seen = set()
            # reduction given: the one-time check of a plain function's reduction runs at full precision
            op = cls(model, loader, recording_cross_entropy(seen, device.type), use_gpu=device.type == "cuda",
                     precision=precision, reduction="mean")
            op.apply(torch.ones(op.size, device=device))
            assert seen == {dtype}, (cls.__name__, precision, seen)


def test_precision_modes_of_ggn_and_fisher_products():
    check_precision_modes(torch.device("cpu"))


@pytest.mark.gpu
def test_precision_modes_of_ggn_and_fisher_products_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    check_precision_modes(torch.device("cuda"))


def test_empirical_fisher_refuses_batchnorm_in_training_mode_at_construction():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().train()
    x, y = classification_data(num=20, din=4, classes=3, seed=15)
    with pytest.raises(ValueError, match=r"BatchNorm layer '1' runs in training mode.*eval_mode=True"):
        EmpiricalFisherOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, eval_mode=False)
    # running statistics (the default) work, and so does eval_mode=False with the layer in eval mode
    op = EmpiricalFisherOperator(model, [(x, y)], F.cross_entropy, use_gpu=False)
    model[1].eval()
    kept_modes = EmpiricalFisherOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, eval_mode=False)
    v = torch.ones(op.size, dtype=torch.float64)
    assert torch.allclose(op.apply(v), kept_modes.apply(v), rtol=1e-12)
    model[1].train()  # switched back after construction: refused at the product, before torch fails
    with pytest.raises(ValueError, match="BatchNorm"):
        kept_modes.apply(v)
