"""Torch's global random state is the same after every public call as before, also when the call
raises: a DataLoader's iterator, a random loss and a random forward pass all draw from it. A
shuffling DataLoader read one batch per product still reshuffles every epoch."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hessian_eigenthings import (
    HVPOperator,
    compute_hessian_eigenthings,
    hessian_density,
    hessian_diagonal,
    hessian_trace,
)
from helpers import classification_data, small_mlp

F = nn.functional


class NoisyForward(nn.Module):
    """A model whose forward pass draws random numbers (as a Bayesian or noise-injecting layer does),
    without changing its outputs."""

    def __init__(self):
        super().__init__()
        self.net = small_mlp(seed=1, width=6)

    def forward(self, x):
        return self.net(x) + 0.0 * torch.randn(x.shape[0], 1, dtype=x.dtype)


def noisy_loss(outputs, targets):
    """cross_entropy that draws random numbers on every call, without changing the loss."""
    return F.cross_entropy(outputs, targets) + 0.0 * torch.rand(()).to(outputs.dtype)


@pytest.fixture
def shuffled():
    x, y = classification_data(num=60, seed=5)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


CALLS = {
    "op.apply": lambda m, d, **kw: HVPOperator(m, d, noisy_loss, use_gpu=False, **kw).apply(
        torch.ones(sum(p.numel() for p in m.parameters()), dtype=torch.float64)),
    "compute_hessian_eigenthings": lambda m, d, **kw: compute_hessian_eigenthings(
        m, d, noisy_loss, 2, mode="lanczos", use_gpu=False, **kw),
    "hessian_trace": lambda m, d, **kw: hessian_trace(m, d, noisy_loss, use_gpu=False, max_products=12,
                                                      verbose=False, **kw),
    "hessian_diagonal": lambda m, d, **kw: hessian_diagonal(m, d, noisy_loss, use_gpu=False, max_products=8,
                                                            verbose=False, **kw),
    "hessian_density": lambda m, d, **kw: hessian_density(m, d, noisy_loss, num_probes=1, num_steps=5,
                                                          use_gpu=False, verbose=False, **kw),
    "loss_and_gradient": lambda m, d, **kw: HVPOperator(m, d, noisy_loss, use_gpu=False, **kw).loss_and_gradient(),
}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("kwargs", [{}, {"cache_batches": False}, {"eval_mode": False}])
def test_every_public_call_leaves_the_global_random_state_as_it_was(shuffled, name, kwargs):
    model = NoisyForward().double()  # (building it seeds the global generator)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    CALLS[name](model, shuffled, **kwargs)
    assert torch.equal(torch.get_rng_state(), before), name


@pytest.mark.parametrize("name", list(CALLS))
def test_also_when_the_call_raises(shuffled, name):
    calls = {"n": 0}

    class FailsLater(NoisyForward):
        def forward(self, x):
            calls["n"] += 1
            if calls["n"] == 4:  # after random numbers were drawn by loader, forward and loss
                raise RuntimeError("a failing forward pass")
            return super().forward(x)

    model = FailsLater().double()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="a failing forward pass"):
        CALLS[name](model, shuffled, cache_batches=False)
    assert torch.equal(torch.get_rng_state(), before), name


class Recording(Dataset):
    """Notes the order in which samples are read."""

    def __init__(self, x, y):
        self.x, self.y, self.read = x, y, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        self.read.append(index)
        return self.x[index], self.y[index]


def test_a_shuffling_dataloader_reshuffles_every_epoch_of_a_mini_batch_operator():
    x, y = classification_data(num=30, seed=6)
    data = Recording(x, y)
    loader = DataLoader(data, batch_size=10, shuffle=True)
    model = small_mlp(seed=2, width=5)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, full_dataset=False)
    v = torch.ones(op.size, dtype=torch.float64)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    for _ in range(9):  # three epochs of three batches
        op.apply(v)
    assert torch.equal(torch.get_rng_state(), before)
    epochs = [data.read[i * 30 : (i + 1) * 30] for i in range(3)]
    assert all(sorted(epoch) == list(range(30)) for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # the first epoch is the order the loader gives from the global state of the first read
    data.read = []
    torch.set_rng_state(before)
    list(loader)
    assert data.read == epochs[0]


def test_dropout_masks_stay_the_same_operator_when_the_batches_are_read_from_a_shuffling_loader():
    # Reading the dataloader (first product) must not shift the dropout masks of later products.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Dropout(0.4), nn.Linear(12, 4)).double().train()
    x, y = classification_data(num=48, seed=4)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, eval_mode=False)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    first = op.apply(v)  # reads the loader, then keeps the batches
    second = op.apply(v)
    assert torch.allclose(first, second, rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_generator_is_left_as_it_was_too(shuffled):
    class CudaNoise(NoisyForward):
        def forward(self, x):
            return super().forward(x) + 0.0 * torch.randn((), device=x.device, dtype=x.dtype)

    model = CudaNoise().double().cuda()
    torch.manual_seed(5)
    before, cpu_before = torch.cuda.get_rng_state(), torch.get_rng_state()
    values, _ = compute_hessian_eigenthings(model, shuffled, noisy_loss, 2, mode="lanczos")
    HVPOperator(model, shuffled, noisy_loss).apply(torch.ones(sum(p.numel() for p in model.parameters()),
                                                               dtype=torch.float64, device="cuda"))
    assert torch.equal(torch.cuda.get_rng_state(), before) and torch.equal(torch.get_rng_state(), cpu_before)
    assert np.all(np.isfinite(values))
