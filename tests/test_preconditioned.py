"""PreconditionedOperator is P^{-1/2} A P^{-1/2} with the spectrum of P^{-1} A, and adam_preconditioner
is exactly the denominator of Adam's update, read without changing the optimizer."""

import numpy as np
import pytest
import torch

from hessian_eigenthings import HVPOperator, LambdaOperator, PreconditionedOperator, adam_preconditioner, lanczos
from helpers import classification_data, dense_loss_hessian, planted_matrix, small_mlp

F = torch.nn.functional


def positive_diagonal(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=gen, dtype=torch.float64) * 4 + 0.25


def test_products_are_the_symmetric_scaling():
    a, _, _ = planted_matrix(np.linspace(-2.0, 5.0, 40))
    p = positive_diagonal(40)
    op = PreconditionedOperator(a, p)
    dense = torch.diag(p.rsqrt()) @ a @ torch.diag(p.rsqrt())
    v = torch.randn(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    block = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(op.apply(v), dense @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.apply_block(block), dense @ block, rtol=1e-12, atol=1e-12)
    assert op.num_products == 4 and op.operator.num_products == 4
    assert (op.size, op.dtype) == (40, torch.float64)


def test_eigenpairs_are_those_of_inverse_p_times_a():
    a, _, _ = planted_matrix(np.linspace(-2.0, 5.0, 60), seed=3)
    p = positive_diagonal(60, seed=4)
    op = PreconditionedOperator(LambdaOperator(lambda v: a @ v, 60, dtype=torch.float64), p)
    vals, vecs = lanczos(op, 3, which="LA", tol=1e-10, verbose=False)
    general = np.linalg.eigvals(np.diag(1 / p.numpy()) @ a.numpy()).real  # P^-1 A is not symmetric
    np.testing.assert_allclose(vals, np.sort(general)[::-1][:3], rtol=1e-9)
    vals_sa, _ = lanczos(op, 2, which="SA", tol=1e-10, verbose=False)
    np.testing.assert_allclose(vals_sa, np.sort(general)[:2], rtol=1e-9)
    # to_original maps eigenvectors of the symmetric form to eigenvectors of P^-1 A
    w = op.to_original(vecs)
    pa = torch.diag(1 / p) @ a
    for lam, row in zip(vals, w):
        assert abs(float(torch.linalg.vector_norm(row)) - 1) < 1e-12
        assert float(torch.linalg.vector_norm(pa @ row - lam * row)) <= 1e-8 * abs(lam)


@pytest.mark.parametrize(
    "diagonal, error, words",
    [
        (torch.ones(5, dtype=torch.float64), ValueError, "shape (n,) = (6,)"),
        (torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64), ValueError, "positive"),
        (torch.tensor([1.0, 2.0, float("nan"), 1.0, 1.0, 1.0], dtype=torch.float64), ValueError, "NaN"),
        ([1.0] * 6, TypeError, "torch.Tensor or numpy"),
    ],
)
def test_bad_diagonal_is_refused_clearly(diagonal, error, words):
    a, _, _ = planted_matrix(np.arange(1.0, 7.0))
    with pytest.raises(error, match=None) as info:
        PreconditionedOperator(a, diagonal)
    assert words in str(info.value)


def adam_run(optimizer_cls, steps, seed=0, **kwargs):
    """A float64 MLP trained full-batch by ``optimizer_cls``; returns model, optimizer, and the gradients
    of every step (to rebuild Adam's moments by hand)."""
    model = small_mlp(seed=seed, width=8)
    x, y = classification_data(num=64)
    opt = optimizer_cls(model.parameters(), **kwargs)
    grads = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
        opt.step()
    return model, opt, grads, (x, y)


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_diagonal_matches_the_moment_recursion(optimizer_cls, amsgrad):
    beta1, beta2, eps, steps = 0.8, 0.95, 1e-6, 5
    # AdamW's decoupled weight decay leaves the moments alone; Adam's would add to the gradient
    decay = 0.1 if optimizer_cls is torch.optim.AdamW else 0.0
    _, opt, grads, _ = adam_run(optimizer_cls, steps, lr=1e-2, betas=(beta1, beta2), eps=eps, amsgrad=amsgrad,
                                weight_decay=decay)
    v = torch.zeros_like(grads[0])
    v_max = torch.zeros_like(grads[0])
    for g in grads:
        v = beta2 * v + (1 - beta2) * g * g
        v_max = torch.maximum(v_max, v)
    second = v_max if amsgrad else v
    expected = (second / (1 - beta2**steps)).sqrt() + eps
    torch.testing.assert_close(adam_preconditioner(opt), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        adam_preconditioner(opt, bias_correction1=True), expected * (1 - beta1**steps), rtol=1e-12, atol=0
    )


def test_adam_diagonal_is_the_denominator_of_the_next_update():
    """theta_{t+1} - theta_t = -lr * m_hat_{t+1} / P_{t+1}, with P read after that step."""
    lr, beta1 = 3e-3, 0.9
    model, opt, _, (x, y) = adam_run(torch.optim.Adam, 3, lr=lr, betas=(beta1, 0.99), eps=1e-8)
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    m = torch.cat([opt.state[p]["exp_avg"].reshape(-1) for p in model.parameters()])
    m_hat = m / (1 - beta1**4)
    torch.testing.assert_close(after - before, -lr * m_hat / adam_preconditioner(opt), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(
        after - before, -lr * m / adam_preconditioner(opt, bias_correction1=True), rtol=1e-9, atol=1e-15
    )


def test_reading_the_diagonal_leaves_the_optimizer_alone():
    model, opt, _, _ = adam_run(torch.optim.Adam, 2, lr=1e-2)
    ids = {id(p): {k: id(v) for k, v in opt.state[p].items()} for p in model.parameters()}
    values = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    adam_preconditioner(opt)
    for p in model.parameters():
        assert {k: id(v) for k, v in opt.state[p].items()} == ids[id(p)]
        for key, value in opt.state[p].items():
            assert torch.equal(value, values[id(p)][key])


def test_adam_diagonal_errors():
    model = small_mlp(width=8)
    with pytest.raises(TypeError, match="Adam / AdamW"):
        adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1))
    fresh = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="first optimizer.step"):
        adam_preconditioner(fresh)
    other = torch.nn.Linear(2, 2).double()
    with pytest.raises(ValueError, match="not optimised by this optimizer"):
        adam_preconditioner(fresh, list(other.parameters()))


def test_preconditioned_hessian_spectrum_against_dense():
    model, opt, _, (x, y) = adam_run(torch.optim.Adam, 3, lr=1e-3)
    model.zero_grad(set_to_none=True)
    diag = adam_preconditioner(opt)
    loader = [(x[:40], y[:40]), (x[40:], y[40:])]
    op = PreconditionedOperator(HVPOperator(model, loader, F.cross_entropy, use_gpu=False), diag)
    vals, _ = lanczos(op, 2, which="LA", tol=1e-10, verbose=False)
    h = dense_loss_hessian(model, F.cross_entropy, x, y)
    exact = np.linalg.eigvalsh((torch.diag(diag.rsqrt()) @ h @ torch.diag(diag.rsqrt())).numpy())[::-1][:2]
    np.testing.assert_allclose(vals, exact, rtol=1e-8)
