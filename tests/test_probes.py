"""The argument checks shared by the probe-based estimators (spectrum/probes.py).

Every stochastic estimator checks its shared arguments through one helper; these tests pin, for
each estimator, the error type and a message that names the public argument and what it accepts,
raised before a single product is spent. They also pin that the helper's probe stream is the one
the estimators have always drawn, so a given seed still gives the same numbers.
"""

import math

import pytest
import torch

from hessian_eigenthings import (
    LambdaOperator,
    exact_diagonal,
    hutchinson_diagonal,
    hutchinson_frobenius,
    hutchinson_trace,
    hutchpp_frobenius,
    hutchpp_trace,
    xdiag,
    xtrace,
    xtrace_frobenius,
)
from hessian_eigenthings.spectrum.probes import ProbeSettings, check_probe_arguments, draw_probes, probe_generator

STOCHASTIC = {
    "hutchinson_trace": hutchinson_trace,
    "hutchpp_trace": hutchpp_trace,
    "hutchinson_diagonal": hutchinson_diagonal,
    "xtrace": xtrace,
    "xdiag": xdiag,
    "hutchinson_frobenius": hutchinson_frobenius,
    "hutchpp_frobenius": hutchpp_frobenius,
    "xtrace_frobenius": xtrace_frobenius,
}

POSITIVE_INT = "must be a positive integer"
POSITIVE_NUMBER = "must be a positive number or None"
# (bad keyword arguments, error type, the message must match): the argument named, then what it accepts
BAD_SHARED_ARGUMENTS = [
    ({"max_products": 0}, ValueError, "max_products " + POSITIVE_INT),
    ({"max_products": 2.5}, TypeError, "max_products " + POSITIVE_INT),
    ({"max_products": True}, TypeError, "max_products " + POSITIVE_INT),
    ({"min_probes": 0}, ValueError, "min_probes " + POSITIVE_INT),
    ({"min_probes": "3"}, TypeError, "min_probes " + POSITIVE_INT),
    ({"block_size": -2}, ValueError, "block_size " + POSITIVE_INT),
    ({"block_size": None}, TypeError, "block_size " + POSITIVE_INT),
    ({"tol": 0}, ValueError, "tol " + POSITIVE_NUMBER),
    ({"tol": -1.0}, ValueError, "tol " + POSITIVE_NUMBER),
    ({"tol": "1e-3"}, ValueError, "tol " + POSITIVE_NUMBER),
    ({"rtol": float("nan")}, ValueError, "rtol " + POSITIVE_NUMBER),
    ({"rtol": float("inf")}, ValueError, "rtol " + POSITIVE_NUMBER),
    ({"distribution": "uniform"}, ValueError, "distribution='uniform' is not supported; use 'rademacher'"),
    ({"distribution": 1}, ValueError, "distribution=1 is not supported; use 'rademacher'"),
]


def counting_identity(n: int = 12) -> LambdaOperator:
    """The n x n identity as an operator that counts its products."""
    return LambdaOperator(lambda v: v.clone(), n, dtype=torch.float64, apply_block_fn=lambda m: m.clone())


@pytest.mark.parametrize("name", list(STOCHASTIC))
@pytest.mark.parametrize("kwargs, error, message", BAD_SHARED_ARGUMENTS, ids=lambda x: repr(x)[:40])
def test_bad_shared_argument_is_named_before_any_product(name, kwargs, error, message):
    op = counting_identity()
    with pytest.raises(error, match=message) as info:
        STOCHASTIC[name](op, verbose=False, **kwargs)
    assert type(info.value) is error
    assert op.num_products == 0


@pytest.mark.parametrize("kwargs, error, message", BAD_SHARED_ARGUMENTS, ids=lambda x: repr(x)[:40])
def test_the_estimators_give_one_and_the_same_message(kwargs, error, message):
    texts = set()
    for estimator in STOCHASTIC.values():
        with pytest.raises(error) as info:
            estimator(counting_identity(), verbose=False, **kwargs)
        texts.add(str(info.value))
    assert len(texts) == 1, texts


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"sketch_size": 0}, ValueError, "sketch_size " + POSITIVE_INT),
        ({"sketch_size": 2.0}, TypeError, "sketch_size " + POSITIVE_INT),
        ({"max_products": 20, "sketch_size": 10}, ValueError, r"max_products=20 .* raise max_products to at least 22"),
    ],
)
def test_hutchpp_sketch_arguments_are_named(kwargs, error, message):
    op = counting_identity(60)
    with pytest.raises(error, match=message):
        hutchpp_trace(op, verbose=False, **kwargs)
    assert op.num_products == 0


@pytest.mark.parametrize(
    "block_size, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("8", TypeError)]
)
def test_exact_diagonal_block_size_is_named(block_size, error):
    op = counting_identity()
    with pytest.raises(error, match="block_size " + POSITIVE_INT):
        exact_diagonal(op, block_size=block_size, verbose=False)
    assert op.num_products == 0


@pytest.mark.parametrize("estimator", [*STOCHASTIC.values(), exact_diagonal])
def test_a_function_instead_of_an_operator_points_at_lambda_operator(estimator):
    with pytest.raises(TypeError, match="LambdaOperator"):
        estimator(lambda v: v, verbose=False)


def test_check_probe_arguments_returns_the_checked_values_and_the_seeded_stream():
    settings = check_probe_arguments(40, None, 0.1, 5, 8, "Gaussian", seed=3)
    assert isinstance(settings, ProbeSettings)
    assert (settings.max_products, settings.tol, settings.rtol, settings.min_probes, settings.block_size) == (
        40, None, 0.1, 5, 8,
    )
    assert settings.distribution == "gaussian" and settings.adaptive
    assert not check_probe_arguments(40, None, None, 5, 8, "rademacher", seed=3).adaptive
    assert check_probe_arguments(40, 1e-3, None, 5, 8, "rademacher", seed=3).adaptive
    # Two draws of the settings' stream are the same numbers as the plain generator of the seed gives.
    op = counting_identity(30)
    drawn = torch.cat([settings.draw(op, 2), settings.draw(op, 3)], dim=1)
    gen = probe_generator(3)
    expected = torch.cat([draw_probes(op, 2, "gaussian", gen), draw_probes(op, 3, "gaussian", gen)], dim=1)
    assert torch.equal(drawn, expected)
    assert math.isclose(float(drawn.square().mean()), 1.0, abs_tol=0.4)  # standard normal entries


def test_the_estimators_draw_the_seeds_stream_in_order():
    """On the identity every value is a closed form of the probes, so each estimator's result is pinned
    by the stream ``probe_generator(seed)`` gives: Rademacher ``z^T I z = n`` exactly; Gaussian
    ``z^T z``; Hutch++ draws its sketch first, then the residual probes, deflated by the sketch's range."""
    n, seed = 12, 5
    trace = hutchinson_trace(counting_identity(n), max_products=20, seed=seed, verbose=False)
    assert trace.estimate == n and trace.std_error == 0.0 and trace.num_products == 20
    diag = hutchinson_diagonal(counting_identity(n), max_products=20, seed=seed, verbose=False)
    assert torch.equal(diag.diagonal, torch.ones(n, dtype=torch.float64))

    op = counting_identity(n)
    gauss = hutchinson_trace(op, max_products=20, distribution="gaussian", seed=seed, verbose=False)
    probes = draw_probes(op, 20, "gaussian", probe_generator(seed))
    assert torch.allclose(torch.as_tensor(gauss.samples), probes.square().sum(dim=0), rtol=1e-14, atol=0)
    gdiag = hutchinson_diagonal(op, max_products=20, distribution="gaussian", seed=seed, verbose=False)
    assert torch.allclose(gdiag.diagonal, probes.square().mean(dim=1), rtol=1e-12, atol=0)

    pp = hutchpp_trace(op, max_products=14, sketch_size=4, distribution="gaussian", seed=seed, verbose=False)
    gen = probe_generator(seed)
    basis, _ = torch.linalg.qr(draw_probes(op, 4, "gaussian", gen))
    residual = draw_probes(op, 6, "gaussian", gen)
    residual = residual - basis @ (basis.T @ residual)
    assert math.isclose(pp.info["exact_part"], 4.0, rel_tol=1e-12)
    assert torch.allclose(torch.as_tensor(pp.samples), residual.square().sum(dim=0), rtol=1e-12, atol=0)
    assert math.isclose(pp.estimate, 4.0 + float(residual.square().sum(dim=0).mean()), rel_tol=1e-12)


@pytest.mark.parametrize("bad", ["abc", 1.5, True, [1]])
def test_a_seed_that_is_not_an_integer_is_refused_by_name(bad):
    from hessian_eigenthings import hutchinson_trace, lanczos

    matrix = torch.eye(6, dtype=torch.float64)
    for call in (lambda: hutchinson_trace(matrix, seed=bad, verbose=False),
                 lambda: lanczos(matrix, 2, seed=bad, verbose=False)):
        with pytest.raises(TypeError, match="seed must be an integer"):
            call()


def test_integral_float_and_numpy_seeds_are_accepted():
    import numpy as np

    from hessian_eigenthings import hutchinson_trace

    matrix = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    reference = hutchinson_trace(matrix, max_products=8, seed=3, verbose=False).estimate
    assert hutchinson_trace(matrix, max_products=8, seed=3.0, verbose=False).estimate == reference
    assert hutchinson_trace(matrix, max_products=8, seed=np.int64(3), verbose=False).estimate == reference


def test_sphere_probes_are_the_gaussian_stream_scaled_to_norm_sqrt_n():
    op = counting_identity(40)
    sphere = draw_probes(op, 500, "sphere", probe_generator(9))
    gauss = draw_probes(op, 500, "gaussian", probe_generator(9))
    norms = torch.linalg.vector_norm(sphere, dim=0)
    assert torch.allclose(norms, torch.full_like(norms, math.sqrt(40)), rtol=1e-14)
    assert torch.allclose(sphere, gauss * (math.sqrt(40) / torch.linalg.vector_norm(gauss, dim=0)), rtol=1e-14)
    # isotropic: E[z z^T] = I, within the sampling error of 500 probes
    second_moment = sphere @ sphere.T / 500
    assert float((second_moment - torch.eye(40, dtype=torch.float64)).abs().max()) < 0.35
    # on the identity every sphere probe gives z^T z = n exactly
    assert hutchinson_trace(op, max_products=20, distribution="Sphere", verbose=False).std_error < 1e-12
