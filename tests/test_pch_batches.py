"""Second-look checks of the PCH: the modified residuals do not depend on how the data is split,
and a curved activation at the model's output (with several outputs) is handled exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import assert_model_unchanged, batches, model_snapshot
from hessian_eigenthings import HVPOperator, PCHOperator, dense_matrix

F = nn.functional


def _block_mask(model: nn.Module) -> torch.Tensor:
    return torch.block_diag(*[torch.ones(p.numel(), p.numel()) for p in model.parameters()]).bool()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_abs_and_clip_do_not_depend_on_the_split_into_batches(reduction):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(17, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (17,), generator=gen)

    def criterion(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction=reduction)

    hessian = dense_matrix(HVPOperator(model, [(x, y)], criterion, use_gpu=False), verbose=False)
    for residual in ("abs", "clip", "keep"):
        whole = dense_matrix(PCHOperator(model, [(x, y)], criterion, residual=residual, use_gpu=False), verbose=False)
        split = dense_matrix(PCHOperator(model, batches(x, y, [8, 5, 4]), criterion, residual=residual,
                                         max_possible_gpu_samples=3, use_gpu=False), verbose=False)
        assert torch.allclose(split, whole, rtol=1e-12, atol=1e-14)
        if residual == "keep":
            assert torch.allclose(whole, hessian * _block_mask(model), rtol=1e-12, atol=1e-14)
        else:
            assert torch.linalg.eigvalsh(whole)[0] > -1e-12 * torch.linalg.eigvalsh(whole)[-1]


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.act = nn.Linear(4, 5), nn.Tanh()
        self.head_p, self.squash, self.head_q = nn.Linear(5, 3), nn.Sigmoid(), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.act(self.body(x))
        return {"p": self.squash(self.head_p(h)), "q": self.head_q(h)}


def test_an_activation_at_the_output_and_two_outputs_keep_the_hessian_blocks():
    torch.manual_seed(4)
    model = TwoHeads().double()
    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(12, 4, generator=gen, dtype=torch.float64), torch.rand(12, 3, generator=gen, dtype=torch.float64)
    data = batches(x, t, [7, 5])

    def criterion(outputs, targets):
        return F.mse_loss(outputs["p"], targets) + 0.1 * outputs["q"].pow(2).mean()

    before = model_snapshot(model)
    hessian = dense_matrix(HVPOperator(model, data, criterion, use_gpu=False), verbose=False)
    kept = dense_matrix(PCHOperator(model, data, criterion, residual="keep", max_possible_gpu_samples=4,
                                    use_gpu=False), verbose=False)
    assert torch.allclose(kept, hessian * _block_mask(model), rtol=1e-12, atol=1e-15)
    pch = dense_matrix(PCHOperator(model, data, criterion, use_gpu=False), verbose=False)
    assert torch.linalg.eigvalsh(pch)[0] > -1e-12
    assert_model_unchanged(model, before)
