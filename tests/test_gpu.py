"""The CUDA path: run with `pytest -m gpu` on a machine with a GPU; skipped without one."""

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import HVPOperator, compute_hessian_eigenthings, deflated_power_iteration, lanczos
from helpers import assert_model_unchanged, batches, classification_data, model_snapshot, small_mlp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
F = nn.functional


def _problem():
    model = small_mlp()
    x, y = classification_data()
    return model, batches(x, y, [500, 12])


def test_cuda_product_matches_cpu():
    model, loader = _problem()
    cpu = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    gpu_model = small_mlp().cuda()
    gpu = HVPOperator(gpu_model, loader, F.cross_entropy, max_possible_gpu_samples=100)
    assert gpu.device.type == "cuda"
    v = torch.randn(cpu.size, dtype=torch.float64)
    out = gpu.apply(v.cuda())
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), cpu.apply(v), rtol=1e-10, atol=1e-12)


def test_use_gpu_with_cpu_model_computes_on_a_copy_and_leaves_model_on_cpu():
    model, loader = _problem()
    before = model_snapshot(model)
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=True)
    assert op.device.type == "cuda"
    v = torch.randn(op.size, dtype=torch.float64, device="cuda")
    first = op.apply(v)
    with torch.no_grad():  # later changes of the user's model are seen by the next product
        model[0].weight.mul_(2)
    assert not torch.allclose(first, op.apply(v))
    with torch.no_grad():
        model[0].weight.div_(2)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert_model_unchanged(model, before)


def test_solvers_on_cuda_operator():
    model, loader = _problem()
    gpu_model = small_mlp().cuda()
    reference = compute_hessian_eigenthings(model, loader, F.cross_entropy, 3, mode="lanczos", use_gpu=False,
                                            verbose=False)
    op = HVPOperator(gpu_model, loader, F.cross_entropy)
    result = deflated_power_iteration(op, 3, power_iter_steps=3000, power_iter_err_threshold=1e-6,
                                      to_numpy=False, verbose=False)
    assert result.eigenvectors.device.type == "cuda"
    assert np.allclose(result.eigenvalues.cpu().numpy(), reference.eigenvalues, rtol=1e-6)
    arpack = lanczos(op, 3, verbose=False)
    assert np.allclose(arpack.eigenvalues, reference.eigenvalues, rtol=1e-8)


def test_fp16_on_cuda_is_close():
    model = small_mlp(dtype=torch.float32).cuda()
    x, y = classification_data(dtype=torch.float32)
    exact = HVPOperator(model, [(x, y)], F.cross_entropy)
    half = HVPOperator(model, [(x, y)], F.cross_entropy, fp16=True)
    v = torch.randn(exact.size, device="cuda")
    a, b = exact.apply(v), half.apply(v)
    assert (a - b).norm() <= 0.05 * a.norm()
