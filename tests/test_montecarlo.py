"""The shared Monte-Carlo loop (spectrum/montecarlo.py): running statistics against numpy, the
clustered error against its formula, stopping rules, the progress count and kept samples."""

import math

import numpy as np
import pytest
import torch

from hessian_eigenthings import MatrixOperator, hutchinson_diagonal, hutchinson_trace
from hessian_eigenthings.spectrum.montecarlo import (
    SampleMoments,
    elementwise_products,
    monte_carlo,
    quadratic_forms,
    squared_norms,
    tolerance_met,
)
from hessian_eigenthings.spectrum.probes import check_probe_arguments
from helpers import mini_batch_like, planted_matrix


class CountingBar:
    """Stands in for a tqdm bar: records the updates and the postfix."""

    disable = False

    def __init__(self):
        self.updates, self.postfix = [], {}

    def update(self, count):
        self.updates.append(count)

    def set_postfix(self, **kwargs):
        self.postfix = kwargs


def blocks_of(values, sizes):
    out, start = [], 0
    for size in sizes:
        out.append(values[:, start : start + size])
        start += size
    return out


def test_running_moments_are_numpy_mean_and_standard_error():
    gen = np.random.default_rng(0)
    values = gen.normal(1e6, 3.0, size=(4, 37))  # a large mean: no cancellation in the variance
    moments = SampleMoments(4, torch.float64, torch.device("cpu"), clustered=False)
    for block in blocks_of(values, [16, 16, 5]):
        moments.add(torch.from_numpy(block))
    np.testing.assert_allclose(moments.mean.numpy(), values.mean(axis=1), rtol=1e-15)
    np.testing.assert_allclose(moments.std_error().numpy(), values.std(axis=1, ddof=1) / math.sqrt(37), rtol=1e-9)
    assert moments.count == 37 and moments.blocks == 3


def test_clustered_error_is_the_formula_over_blocks_and_the_ordinary_one_for_single_samples():
    gen = np.random.default_rng(1)
    sizes = [8, 8, 8, 3]
    values = gen.normal(5.0, 1.0, size=(3, sum(sizes))) + np.repeat(gen.normal(0, 2.0, size=(3, 4)), sizes, axis=1)
    moments = SampleMoments(3, torch.float64, torch.device("cpu"), clustered=True)
    for block in blocks_of(values, sizes):
        moments.add(torch.from_numpy(block))
    mean = values.mean(axis=1)
    sums = np.stack([b.sum(axis=1) for b in blocks_of(values, sizes)], axis=1)
    spread = ((sums - np.array(sizes) * mean[:, None]) ** 2).sum(axis=1) * 4 / 3
    np.testing.assert_allclose(moments.std_error().numpy(), np.sqrt(spread) / sum(sizes), rtol=1e-10)
    single = SampleMoments(3, torch.float64, torch.device("cpu"), clustered=True)
    plain = SampleMoments(3, torch.float64, torch.device("cpu"), clustered=False)
    for j in range(values.shape[1]):
        single.add(torch.from_numpy(values[:, j : j + 1]))
        plain.add(torch.from_numpy(values[:, j : j + 1]))
    np.testing.assert_allclose(single.std_error().numpy(), plain.std_error().numpy(), rtol=1e-10)
    lone = SampleMoments(3, torch.float64, torch.device("cpu"), clustered=True)
    lone.add(torch.from_numpy(values[:, :8]))
    assert torch.all(torch.isinf(lone.std_error()))


def test_tolerance_rule_is_either_bound_and_sign_blind():
    se = torch.tensor([0.1], dtype=torch.float64)
    assert tolerance_met(se, torch.tensor([-20.0]), None, 0.01) and tolerance_met(se, torch.tensor([20.0]), None, 0.01)
    assert not tolerance_met(se, torch.tensor([5.0]), 0.05, 0.01)
    assert tolerance_met(se, torch.tensor([5.0]), 0.1, 0.01)
    vec = torch.tensor([0.1, 0.3], dtype=torch.float64)
    assert not tolerance_met(vec, torch.tensor([1.0, 1.0]), 0.2, None)  # every entry within tol
    assert tolerance_met(vec, torch.tensor([3.0, 4.0]), None, 0.07)  # ||se|| <= rtol ||estimate||


def test_the_loop_with_an_integrand_and_a_sampler():
    a, lam, _ = planted_matrix(list(np.linspace(1.0, 2.0, 20)), seed=2)
    op = MatrixOperator(a)
    settings = check_probe_arguments(50, None, None, 10, 16, "gaussian", 4)
    drawn = []

    def sampler(count):
        drawn.append(settings.draw(op, count))
        return drawn[-1]

    bar = CountingBar()
    run = monte_carlo(op, sampler, squared_norms, 50, settings, bar, keep_samples=True)
    probes = torch.cat(drawn, dim=1)
    expected = (a @ probes).square().sum(dim=0)
    np.testing.assert_allclose(run.samples, expected.numpy(), rtol=1e-12)
    assert float(run.mean[0]) == pytest.approx(float(expected.mean()), rel=1e-13)
    assert bar.updates == [16, 16, 16, 2] and op.num_products == 50 and run.converged and not run.clustered
    assert bar.postfix == {}  # no tolerance: the statistics are not read on the host before the end
    # a tolerance stops after min_probes at the first block that meets it
    settings = check_probe_arguments(500, 1e9, None, 20, 8, "rademacher", 4)
    bar = CountingBar()
    run = monte_carlo(op, lambda b: settings.draw(op, b), quadratic_forms, 500, settings, bar)
    assert run.converged and run.num_samples == 24  # 8, 16: below min_probes; 24: stop
    assert set(bar.postfix) == {"estimate", "std_error"}
    # vector samples (a diagonal), with an offset for the relative tolerance
    settings = check_probe_arguments(64, None, 1e-9, 10, 16, "rademacher", 4)
    run = monte_carlo(op, lambda b: settings.draw(op, b), elementwise_products, 64, settings, CountingBar(),
                      offset=torch.ones(20, dtype=torch.float64))
    assert run.mean.shape == (20,) and not run.converged and run.samples.size == 0


def test_estimators_report_the_clustered_flag_of_the_loop():
    a, _, _ = planted_matrix(list(np.linspace(-1.0, 3.0, 30)), seed=1)
    assert hutchinson_trace(mini_batch_like(a, 0.3, 0), max_products=32, verbose=False).info["clustered"]
    assert not hutchinson_trace(a, max_products=32, verbose=False).info["clustered"]
    assert hutchinson_diagonal(mini_batch_like(a, 0.3, 0), max_products=32, verbose=False).info["clustered"]
