"""The operator interface: dtype inference of LambdaOperator, and the check of every product's output."""

import numpy as np
import pytest
import torch

from hessian_eigenthings import LambdaOperator, Operator, lanczos
from helpers import exact_top, planted_matrix


def test_a_float64_lambda_operator_without_dtype_finds_its_dtype():
    a, _, _ = planted_matrix([5.0, -4.0, 3.0] + [0.1] * 27, seed=1)
    op = LambdaOperator(lambda v: a @ v, 30)  # a float64 closure fails on float32 vectors
    assert op.dtype == torch.float64 and op.num_products == 0  # the probe is not a counted product
    values, _ = lanczos(op, 2, verbose=False)
    assert np.allclose(values, exact_top(a, 2)[0], rtol=1e-10)
    # a closure that converts its input returns float64 too, and a float32 one stays float32
    assert LambdaOperator(lambda v: a @ v.double(), 30).dtype == torch.float64
    assert LambdaOperator(lambda v: a.float() @ v, 30).dtype == torch.float32
    assert LambdaOperator(lambda v: 2 * v, 30).dtype == torch.get_default_dtype()
    assert LambdaOperator(lambda v: a @ v, 30, dtype=torch.float32).dtype == torch.float32  # as given


def test_the_dtype_probe_leaves_the_global_random_state_and_explains_a_failure():
    state = torch.get_rng_state()
    LambdaOperator(lambda v: v + 0 * torch.rand(v.shape, dtype=v.dtype), 8)
    assert torch.equal(torch.get_rng_state(), state)

    def broken(v):
        raise KeyError("no such layer")

    with pytest.raises(TypeError, match="dtype=") as info:
        LambdaOperator(broken, 8)
    assert "no such layer" in str(info.value)


class Wrong(Operator):
    """Returns what ``make(v)`` makes: a deliberately wrong product."""

    def __init__(self, make):
        super().__init__(6, torch.float64)
        self.make = make

    def _matvec(self, vec):
        return self.make(vec)


@pytest.mark.parametrize("make,words", [
    (lambda v: v[:5], ["shape (5,)", "input of shape (6,)"]),
    (lambda v: v.float(), ["torch.float32", "torch.float64"]),
    (lambda v: v.numpy(), ["ndarray"]),
    (lambda v: v.to("meta"), ["meta"]),
])
def test_an_operator_returning_a_wrong_product_is_named_at_once(make, words):
    op = Wrong(make)
    # the default block product runs _matvec per column and names it
    for call, arg in ((op.apply, torch.ones(6, dtype=torch.float64)), (op.apply_block, torch.ones(6, 2, dtype=torch.float64))):
        method = "_matvec"
        with pytest.raises(TypeError) as info:
            call(arg)
        message = str(info.value)
        assert f"Wrong.{method}" in message, message
        for word in words:
            if arg.dim() == 2 and "shape" in word:
                continue  # the block's shapes differ
            assert word in message, message
    assert op.num_products == 0


def test_a_block_product_of_the_wrong_shape_is_named():
    class WrongBlock(Wrong):
        def _matmat(self, mat):
            return mat[:, :1]

    with pytest.raises(TypeError, match=r"WrongBlock._matmat returned a torch.float64 tensor of shape \(6, 1\)"):
        WrongBlock(lambda v: v).apply_block(torch.ones(6, 2, dtype=torch.float64))


def test_a_right_product_passes_the_check():
    op = Wrong(lambda v: 2 * v)
    assert torch.equal(op.apply(torch.ones(6, dtype=torch.float64)), torch.full((6,), 2.0, dtype=torch.float64))
    assert op.apply_block(torch.ones(6, 3, dtype=torch.float64)).shape == (6, 3)
    assert op.num_products == 4
