"""Every one-call helper accepts every option of the operator it builds, with one default for
max_possible_gpu_samples everywhere."""

import inspect

import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    EmpiricalFisherOperator,
    GGNOperator,
    HVPOperator,
    SharpnessTracker,
    compute_hessian_eigenthings,
    hessian_density,
    hessian_diagonal,
    hessian_trace,
    loss_hessian,
)
from hessian_eigenthings.operators.options import (
    DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
    operator_options,
    resolve_max_possible_gpu_samples,
)
from hessian_eigenthings.spectrum.api import curvature_operator
from helpers import classification_data, small_mlp

F = nn.functional

# A value each option refuses, the error, and a word of its message: the operator's own check
# speaks, so the helper passed the option on (an unknown name would be a TypeError naming it).
BAD = {
    "params": (["nope"], ValueError, "nope"),
    "eval_mode": ("no", TypeError, "eval_mode"),
    "device": ("warp9", ValueError, "device"),
    "check_finite": ("no", TypeError, "check_finite"),
    "cache_batches": ("no", TypeError, "cache_batches"),
    "cache_max_bytes": (0, ValueError, "cache_max_bytes"),
    "cache_graphs": ("no", TypeError, "cache_graphs"),
    "graph_cache_max_bytes": (0, ValueError, "graph_cache_max_bytes"),
    "precision": ("int8", ValueError, "precision"),
    "reduction": ("average", ValueError, "reduction"),
    "batch_size_fn": (3, TypeError, "batch_size_fn"),
    "backend": ("jvp", ValueError, "backend"),
    "batched": ("yes", TypeError, "batched"),
}

HELPERS = {
    "compute_hessian_eigenthings": lambda m, d, **kw: compute_hessian_eigenthings(m, d, F.cross_entropy, 2, **kw),
    "hessian_trace": lambda m, d, **kw: hessian_trace(m, d, F.cross_entropy, **kw),
    "hessian_diagonal": lambda m, d, **kw: hessian_diagonal(m, d, F.cross_entropy, **kw),
    "hessian_density": lambda m, d, **kw: hessian_density(m, d, F.cross_entropy, **kw),
    "loss_hessian": lambda m, d, **kw: loss_hessian(m, d, F.cross_entropy, **kw),
    "SharpnessTracker": lambda m, d, **kw: SharpnessTracker(m, d, F.cross_entropy, **kw),
    "curvature_operator": lambda m, d, **kw: curvature_operator(m, d, F.cross_entropy, **kw),
}


def test_the_table_covers_every_option():
    assert set(BAD) == set(operator_options(HVPOperator))
    assert set(operator_options(GGNOperator)) == set(BAD) - {"backend", "batched"}
    assert set(operator_options(EmpiricalFisherOperator)) == set(BAD) - {"backend", "batched"} | {"per_sample"}


@pytest.mark.parametrize("helper", list(HELPERS))
@pytest.mark.parametrize("option", list(BAD))
def test_every_helper_passes_every_option_to_the_operator(helper, option):
    model = small_mlp(width=6)
    data = [classification_data(num=16)]
    value, error, word = BAD[option]
    with pytest.raises(error, match=word) as info:
        HELPERS[helper](model, data, use_gpu=False, **{option: value})
    assert "unknown keyword" not in str(info.value)


@pytest.mark.parametrize("helper", list(HELPERS))
def test_an_unknown_option_is_named_with_the_operators_options(helper):
    model = small_mlp(width=6)
    data = [classification_data(num=16)]
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) stepz.*batch_size_fn"):
        HELPERS[helper](model, data, use_gpu=False, stepz=3)


def test_the_curvature_decides_which_options_exist():
    model = small_mlp(width=6)
    data = [classification_data(num=16)]
    with pytest.raises(TypeError, match="per_sample"):
        hessian_trace(model, data, F.cross_entropy, use_gpu=False, per_sample="loop")
    estimate = hessian_trace(model, data, F.cross_entropy, use_gpu=False, curvature="fisher", per_sample="loop",
                             max_products=6, verbose=False)
    assert torch.isfinite(torch.tensor(estimate.estimate))
    with pytest.raises(TypeError, match="backend"):
        hessian_trace(model, data, F.cross_entropy, use_gpu=False, curvature="ggn", backend="auto")


def test_one_default_for_max_possible_gpu_samples():
    for function in (HVPOperator.__init__, GGNOperator.__init__, compute_hessian_eigenthings, hessian_trace,
                     hessian_diagonal, hessian_density, loss_hessian, SharpnessTracker.__init__, curvature_operator):
        default = inspect.signature(function).parameters["max_possible_gpu_samples"].default
        assert default is DEFAULT_MAX_POSSIBLE_GPU_SAMPLES is None, function


def test_the_default_micro_batch_is_the_whole_batch_on_a_cpu_and_256_rows_on_a_gpu():
    assert resolve_max_possible_gpu_samples(None, "cpu") >= 2**31
    assert resolve_max_possible_gpu_samples(None, "cuda") == 256
    assert resolve_max_possible_gpu_samples(64, "cpu") == resolve_max_possible_gpu_samples(64, "cuda") == 64
    with pytest.raises(ValueError, match="max_possible_gpu_samples"):
        resolve_max_possible_gpu_samples(0, "cpu")
    model = small_mlp(width=6)
    x, y = classification_data(num=600)
    assert HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False).max_possible_gpu_samples >= 600
    assert HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False,
                       max_possible_gpu_samples=256).max_possible_gpu_samples == 256
