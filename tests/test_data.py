"""Batches as operators read them: containers of every kind, a single (inputs, targets) pair."""

from collections import UserDict, namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import HVPOperator, compute_hessian_eigenthings
from hessian_eigenthings.data import as_batches, call_model, map_tensors, move_to, num_samples, slice_samples
from helpers import classification_data, dense_loss_hessian, exact_top, small_mlp

F = nn.functional
Pair = namedtuple("Pair", ["a", "b"])


def test_nested_containers_keep_their_types_when_sliced_and_moved():
    x = torch.arange(12.0).reshape(6, 2)
    nested = (UserDict({"x": x, "pair": Pair(x[:, 0], [x, 3])}), {"scale": torch.tensor(2.0)}, "tag")
    sliced = slice_samples(nested, 1, 3)
    assert type(sliced[0]) is UserDict and type(sliced[0]["pair"]) is Pair
    assert torch.equal(sliced[0]["x"], x[1:3]) and torch.equal(sliced[0]["pair"].a, x[1:3, 0])
    assert sliced[0]["pair"].b[1] == 3 and sliced[2] == "tag"
    assert sliced[1]["scale"].dim() == 0  # a tensor without a sample dimension is kept whole
    moved = move_to(nested, torch.device("cpu"))
    assert type(moved[0]) is UserDict and moved[0]["x"] is x
    assert num_samples(nested, x[:, 0], 0) == 6
    doubled = map_tensors(lambda t: 2 * t, nested)
    assert torch.equal(doubled[0]["pair"].b[0], 2 * x)


def test_a_mapping_of_inputs_is_passed_by_keyword():
    class Kw(nn.Module):
        def forward(self, first, second):
            return first - second

    out = call_model(Kw(), UserDict({"second": torch.ones(2), "first": torch.zeros(2)}))
    assert torch.equal(out, -torch.ones(2))


def test_a_single_pair_of_tensors_is_one_batch():
    x, y = classification_data(num=50)
    assert as_batches((x, y)) == [(x, y)]
    batch_list = [(x[:20], y[:20]), (x[20:], y[20:])]
    assert as_batches(batch_list) is batch_list  # a list of two batches stays one
    model = small_mlp(width=6)
    hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
    v = torch.randn(hessian.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for data in ((x, y), [x, y]):
        op = HVPOperator(model, data, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=16)
        assert torch.allclose(op.apply(v), hessian @ v, rtol=1e-10, atol=1e-12)
    values, _ = compute_hessian_eigenthings(model, (x, y), F.cross_entropy, 2, mode="lanczos", use_gpu=False)
    assert np.allclose(values, exact_top(hessian, 2)[0], rtol=1e-8)


def test_a_bad_batch_size_fn_result_is_refused_clearly():
    x = torch.zeros(4, 2)
    with pytest.raises(TypeError, match="batch_size_fn returned 2.5"):
        num_samples(x, x, 0, lambda i, t: 2.5)
    with pytest.raises(ValueError, match="batch_size_fn returned -1"):
        num_samples(x, x, 0, lambda i, t: -1)
    assert num_samples(x, x[:1], 0, lambda i, t: torch.tensor(7)) == 7
    with pytest.raises(ValueError, match="batch_size_fn"):
        num_samples(x, x[:1], 3)  # first dimensions disagree: the message offers batch_size_fn
