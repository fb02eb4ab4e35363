"""Exact references for the tests: dense Hessians by autograd, planted spectra, small models."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call


def trainable(model: nn.Module, names: Optional[Sequence[str]] = None) -> tuple[list[str], list[Tensor]]:
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (names is None or n in names)]
    return [n for n, _ in pairs], [p for _, p in pairs]


def dense_loss_hessian(
    model: nn.Module, criterion: Callable, inputs: Tensor, targets: Tensor, names: Optional[Sequence[str]] = None
) -> Tensor:
    """The (n, n) Hessian of criterion(model(inputs), targets) w.r.t. the chosen parameters, by autograd."""
    chosen_names, params = trainable(model, names)
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat: Tensor) -> Tensor:
        pieces, start = {}, 0
        for name, p in zip(chosen_names, params):
            pieces[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return criterion(functional_call(model, pieces, (inputs,)), targets)

    return torch.autograd.functional.hessian(loss_of, flat0)


def planted_matrix(eigenvalues: Sequence[float], seed: int = 0, dtype=torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """A random symmetric matrix with the given spectrum: returns (A, eigenvalues, eigenvectors as columns)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.tensor(list(eigenvalues), dtype=torch.float64)
    a = (q * lam) @ q.T
    a = (a + a.T) / 2
    return a.to(dtype), lam.to(dtype), q.to(dtype)


def exact_top(matrix: Tensor, k: int, which: str = "LM") -> tuple[np.ndarray, np.ndarray]:
    """Reference eigenpairs by numpy.linalg.eigh, ordered most extreme first in the sense of which; vectors as rows (k, n)."""
    vals, vecs = np.linalg.eigh(matrix.detach().cpu().double().numpy())
    if which == "LM":
        order = np.argsort(-np.abs(vals), kind="stable")
    elif which == "LA":
        order = np.argsort(-vals, kind="stable")
    else:
        order = np.argsort(vals, kind="stable")
    order = order[:k]
    return vals[order], vecs[:, order].T


def abs_cosines(found: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|cos| between matching rows of two (k, n) arrays."""
    found = np.asarray(found, dtype=np.float64)
    exact = np.asarray(exact, dtype=np.float64)
    num = np.abs(np.sum(found * exact, axis=1))
    return num / (np.linalg.norm(found, axis=1) * np.linalg.norm(exact, axis=1))


def small_mlp(seed: int = 0, din: int = 10, width: int = 24, dout: int = 4, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, dout)).to(dtype)


def classification_data(num: int = 512, din: int = 10, classes: int = 4, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num, din, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (num,), generator=gen)
    return x, y


def batches(x: Tensor, y: Tensor, sizes: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Split (x, y) into consecutive batches of the given sizes (which must add up to len(x))."""
    assert sum(sizes) == len(x)
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


def model_snapshot(model: nn.Module) -> dict:
    """Everything a call must leave untouched: values, buffers, grads (identity and values), flags."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "grad_ids": {n: id(p.grad) for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
    }


def assert_model_unchanged(model: nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    for key in ("grad_ids", "requires_grad", "training"):
        assert after[key] == before[key], key
    for key in ("params", "buffers"):
        for name, value in before[key].items():
            assert torch.equal(after[key][name], value), f"{key} {name} changed"
    for name, value in before["grads"].items():
        if value is None:
            assert after["grads"][name] is None
        else:
            assert torch.equal(after["grads"][name], value), f"grad {name} changed"


def mini_batch_like(matrix: Tensor, shift_sd: float, seed: int):
    """A stochastic operator like a mini-batch Hessian: every (block) product is with ``matrix + c I``
    for a fresh ``c ~ N(0, shift_sd^2)`` shared by the block's columns; its expectation is ``matrix``."""
    from hessian_eigenthings.operators.base import Operator

    class MiniBatchLike(Operator):
        is_stochastic = True

        def __init__(self) -> None:
            super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
            self.gen = torch.Generator().manual_seed(seed)

        def _matvec(self, vec: Tensor) -> Tensor:
            return self._matmat(vec.unsqueeze(1)).squeeze(1)

        def _matmat(self, mat: Tensor) -> Tensor:
            shift = float(torch.randn((), generator=self.gen, dtype=torch.float64)) * shift_sd
            return matrix @ mat + shift * mat

    return MiniBatchLike()
