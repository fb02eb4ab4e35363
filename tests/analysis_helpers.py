"""Exact references for the analysis tests: dense GGNs, blocks, losses at perturbed parameters, counters."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call


def flat_params(model: nn.Module) -> tuple[list[str], list[Tensor], Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    return names, params, torch.cat([p.detach().reshape(-1) for p in params])


def as_dict(flat: Tensor, names: Sequence[str], params: Sequence[Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, p in zip(names, params):
        out[name] = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
    return out


def loss_at(model: nn.Module, criterion: Callable, inputs: Tensor, targets: Tensor, flat: Tensor) -> float:
    """criterion(model(inputs), targets) with the trainable parameters set to ``flat``, in eval mode,
    on the whole data at once (the reference for losses over a dataloader)."""
    names, params, _ = flat_params(model)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(criterion(functional_call(model, as_dict(flat, names, params), (inputs,)), targets))
    finally:
        model.train(training)


def dense_ggn_cross_entropy(model: nn.Module, inputs: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """The Gauss-Newton matrix sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i (over N for the mean) of
    cross-entropy, by autograd Jacobians in the model's dtype."""
    names, params, flat0 = flat_params(model)

    def outputs(flat: Tensor) -> Tensor:
        return functional_call(model, as_dict(flat, names, params), (inputs,))

    jac = torch.autograd.functional.jacobian(outputs, flat0)  # (N, C, n)
    with torch.no_grad():
        probs = torch.softmax(outputs(flat0), dim=1)
    h_out = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)  # (N, C, C)
    ggn = torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac)
    return ggn / len(inputs) if reduction == "mean" else ggn


def block_of(matrix: Tensor, model: nn.Module, group: Sequence[str]) -> Tensor:
    """The principal submatrix of ``matrix`` (in the layout of the trainable parameters) for ``group``."""
    names, params, _ = flat_params(model)
    index, start = [], 0
    for name, p in zip(names, params):
        if name in group:
            index.extend(range(start, start + p.numel()))
        start += p.numel()
    index = torch.tensor(index)
    return matrix[index][:, index]


class CountingLoader:
    """A list of batches that counts how often it is iterated and how many batches it hands out."""

    def __init__(self, batches: list) -> None:
        self.batches = batches
        self.iterations = 0
        self.batches_read = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self.iterations += 1
        for batch in self.batches:
            self.batches_read += 1
            yield batch


class ForwardCounter:
    """Counts the model's forward calls (a hook on the top module)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1

    def remove(self) -> None:
        self.handle.remove()
