"""Losses that average or sum over samples: exact Hessians of the mean or the summed loss over the
whole dataset, for unequal batches and micro-batches; a plain function's reduction found from the
data; curvature weighted per batch where the user says how (batch_size_fn)."""

import functools
import warnings

import pytest
import torch
from torch import nn

from hessian_eigenthings import EmpiricalFisherOperator, GGNOperator, HVPOperator, dense_matrix
from helpers import batches, classification_data, dense_loss_hessian, small_mlp

F = nn.functional


def dense(op):
    return dense_matrix(op, verbose=False)


def close(a, b, tol=1e-10):
    return torch.allclose(a, b, rtol=tol, atol=tol * b.abs().max())


@pytest.fixture(scope="module")
def problem():
    model = small_mlp(seed=2, width=8)
    x, y = classification_data(num=90, seed=2)
    loader = batches(x, y, [40, 37, 13])  # unequal batches
    mean = dense_loss_hessian(model, F.cross_entropy, x, y)
    summed = dense_loss_hessian(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x, y)
    return model, loader, mean, summed


def sum_function(outputs, targets):
    return F.cross_entropy(outputs, targets, reduction="sum")


CRITERIA = {
    "module": (nn.CrossEntropyLoss(reduction="sum"), nn.CrossEntropyLoss()),
    "partial": (functools.partial(F.cross_entropy, reduction="sum"), functools.partial(F.cross_entropy)),
    "function": (sum_function, F.cross_entropy),
}


@pytest.mark.parametrize("kind", list(CRITERIA))
@pytest.mark.parametrize("micro", [10**6, 16])
def test_sum_and_mean_losses_give_the_hessian_of_the_summed_and_the_mean_loss(problem, kind, micro):
    model, loader, mean, summed = problem
    sum_loss, mean_loss = CRITERIA[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning where the reduction is clear
        by_sum = HVPOperator(model, loader, sum_loss, use_gpu=False, max_possible_gpu_samples=micro)
        by_mean = HVPOperator(model, loader, mean_loss, use_gpu=False, max_possible_gpu_samples=micro)
        assert close(dense(by_sum), summed)
        assert close(dense(by_mean), mean)
    assert by_sum.reduction == "sum" and by_mean.reduction == "mean"
    assert by_sum.num_samples == by_mean.num_samples == 90


def test_the_reduction_argument_and_its_checks(problem):
    model, loader, mean, summed = problem
    told = HVPOperator(model, loader, sum_function, use_gpu=False, reduction="sum")
    assert told.reduction == "sum" and close(dense(told), summed)
    with pytest.raises(ValueError, match="contradicts"):
        HVPOperator(model, loader, nn.CrossEntropyLoss(reduction="sum"), reduction="mean")
    with pytest.raises(ValueError, match="reduction='none'"):
        HVPOperator(model, loader, nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="'mean'"):
        HVPOperator(model, loader, F.cross_entropy, reduction="average")


def test_a_mini_batch_operator_with_a_sum_loss_is_each_batch_summed_hessian(problem):
    model, loader, _, _ = problem
    op = HVPOperator(model, loader, sum_function, use_gpu=False, full_dataset=False, max_possible_gpu_samples=16)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for bx, by in loader:
        assert close(op.apply(v), dense_loss_hessian(model, sum_function, bx, by) @ v)


def test_a_loss_that_is_neither_gets_a_warning_saying_what_is_computed(problem):
    model, loader, _, _ = problem
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)

    def weighted(outputs, targets):  # a weighted mean: sum w_y l / sum w_y
        return F.cross_entropy(outputs, targets, weight=weights)

    op = HVPOperator(model, loader, weighted, use_gpu=False)
    with pytest.warns(UserWarning, match="neither a per-sample mean nor a per-sample sum.*weighted by their samples"):
        got = dense(op)
    # what it says: the sample-weighted mean of the batches' Hessians
    expected = sum(len(bx) * dense_loss_hessian(model, weighted, bx, by) for bx, by in loader) / 90
    assert close(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dense(HVPOperator(model, loader, weighted, use_gpu=False, reduction="mean"))  # silenced


def test_batches_of_one_sample_are_put_together_to_find_the_reduction(problem):
    model, _, _, _ = problem
    x, y = classification_data(num=5, seed=4)
    singles = batches(x, y, [1] * 5)
    summed = dense_loss_hessian(model, sum_function, x, y)
    v = torch.randn(summed.shape[0], 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op = HVPOperator(model, singles, sum_function, use_gpu=False)
        assert close(op.apply_block(v), summed @ v) and op.reduction == "sum"
        # one batch of one sample: a mean and a sum are the same, so there is nothing to find or say
        one = HVPOperator(model, singles[:1], sum_function, use_gpu=False)
        assert close(one.apply_block(v), dense_loss_hessian(model, sum_function, x[:1], y[:1]) @ v)
        assert one.reduction is None


def test_micro_batches_of_one_sample_are_exact_for_both_reductions(problem):
    model, loader, mean, summed = problem
    v = torch.randn(mean.shape[0], 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for criterion, hessian in ((sum_function, summed), (F.cross_entropy, mean)):
        op = HVPOperator(model, loader, criterion, use_gpu=False, max_possible_gpu_samples=1)
        assert close(op.apply_block(v), hessian @ v)


def test_losses_that_cannot_show_the_reduction_are_taken_as_a_mean_with_a_warning(problem):
    model, loader, _, _ = problem

    def zero_valued(outputs, targets):  # zero at the data, curved around it: its Hessian is 2 J^T J
        return ((outputs - outputs.detach()) ** 2).sum()

    x = torch.cat([bx for bx, _ in loader])
    summed = dense_loss_hessian(model, zero_valued, x, None)
    v = torch.randn(summed.shape[0], 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    op = HVPOperator(model, loader, zero_valued, use_gpu=False)
    with pytest.warns(UserWarning, match="Cannot tell whether the criterion averages or sums"):
        got = op.apply_block(v)
    # as the warning says: each batch loss taken as a mean, weighted by its samples
    as_mean = sum(len(bx) * dense_loss_hessian(model, zero_valued, bx, None) for bx, _ in loader) / 90
    assert close(got, as_mean @ v) and op.reduction == "mean"
    told = HVPOperator(model, loader, zero_valued, use_gpu=False, reduction="sum")
    assert close(told.apply_block(v), summed @ v)


def test_the_check_of_the_reduction_leaves_dropout_masks_and_batchnorm_alone():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 4))
    model = model.double().train()
    x, y = classification_data(num=40, seed=3)
    stats = [b.clone() for b in model.buffers()]
    op = HVPOperator(model, [(x, y)], sum_function, use_gpu=False, eval_mode=False)
    told = HVPOperator(model, [(x, y)], sum_function, use_gpu=False, eval_mode=False, reduction="sum")
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    first = op.apply(v)  # checks the reduction first
    assert op.reduction == "sum"
    assert torch.equal(first, op.apply(v)) and torch.equal(first, told.apply(v))  # the same dropout masks
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), stats))


def test_ggn_and_empirical_fisher_of_a_summed_loss_are_those_of_the_sum(problem):
    model, loader, mean, summed = problem
    ggn_mean = dense(GGNOperator(model, loader, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=16))
    ggn_sum = dense(GGNOperator(model, loader, sum_function, use_gpu=False, max_possible_gpu_samples=16))
    assert close(ggn_sum, 90 * ggn_mean)  # J^T H_out J with H_out of the summed loss
    x = torch.cat([bx for bx, _ in loader])
    y = torch.cat([by for _, by in loader])
    params = list(model.parameters())
    grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)]) for i in range(90)])
    for per_sample in ("vmap", "loop"):
        fisher_sum = dense(EmpiricalFisherOperator(model, loader, sum_function, use_gpu=False,
                                                   max_possible_gpu_samples=16, per_sample=per_sample))
        assert close(fisher_sum, grads.T @ grads)  # sum_i g_i g_i^T
        fisher_mean = dense(EmpiricalFisherOperator(model, loader, F.cross_entropy, use_gpu=False,
                                                    per_sample=per_sample))
        assert close(fisher_mean, grads.T @ grads / 90)
    # a linear model: the GGN of the summed squared error is its Hessian, 2 X^T X
    lin = nn.Linear(3, 1).double()
    gen = torch.Generator().manual_seed(5)
    xr, yr = torch.randn(30, 3, generator=gen, dtype=torch.float64), torch.randn(30, 1, generator=gen, dtype=torch.float64)
    sse = dense(GGNOperator(lin, batches(xr, yr, [20, 10]), nn.MSELoss(reduction="sum"), use_gpu=False))
    design = torch.cat([xr, torch.ones(30, 1, dtype=torch.float64)], dim=1)
    assert close(sse, 2 * design.T @ design, 1e-12)


# -- batches whose tensors share no first dimension: batch_size_fn ---------------------------------
VOCAB, LENGTH = 7, 5


class TinyLM(nn.Module):
    """Tokens (B, T) -> flattened logits (B*T, V), as language-model training code often returns."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, VOCAB)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + torch.tanh(self.mix(h.cumsum(dim=1)))  # each position sees its prefix
        return self.head(h).reshape(-1, VOCAB)


def lm_data(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (sum(sizes), LENGTH), generator=gen)
    targets = torch.randint(0, VOCAB, (sum(sizes), LENGTH), generator=gen)
    return tokens, targets


def dense_lm_hessian(model, tokens, flat_targets, loss=F.cross_entropy):
    return dense_loss_hessian(model, loss, tokens, flat_targets)


def test_flattened_language_model_targets_are_weighted_by_batch_size_fn():
    torch.manual_seed(0)
    model = TinyLM().double()
    tokens, targets = lm_data([3, 5, 2])
    loader = [(tokens[a:b], targets[a:b].reshape(-1)) for a, b in ((0, 3), (3, 8), (8, 10))]
    exact = dense_lm_hessian(model, tokens, targets.reshape(-1))  # mean over every token of the dataset
    without = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    with pytest.raises(ValueError, match="cannot tell its number of samples.*batch_size_fn"):
        without.apply(torch.zeros(without.size, dtype=torch.float64))
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, batch_size_fn=lambda x, y: x.shape[0])
    assert close(dense(op), exact)
    assert op.num_samples == 10 and op.reduction == "mean"
    # such a batch cannot be split exactly: refused, naming the option to raise
    small = HVPOperator(model, loader, F.cross_entropy, use_gpu=False, batch_size_fn=lambda x, y: x.shape[0],
                        max_possible_gpu_samples=4)
    with pytest.raises(ValueError, match=r"Batch 1 holds 5 samples, more than max_possible_gpu_samples=4"):
        small.apply(torch.zeros(small.size, dtype=torch.float64))
    # summed over tokens: the Hessian of the sum, whatever the weights
    token_sum = functools.partial(F.cross_entropy, reduction="sum")
    op = HVPOperator(model, loader, token_sum, use_gpu=False, batch_size_fn=lambda x, y: x.shape[0])
    assert close(dense(op), dense_lm_hessian(model, tokens, targets.reshape(-1), token_sum))


def test_padded_targets_counted_by_batch_size_fn_give_the_mean_over_real_tokens_with_micro_batches():
    torch.manual_seed(1)
    model = TinyLM().double()
    tokens, targets = lm_data([4, 3])
    targets[0, 3:] = -100  # padding, ignored by the loss: batches hold unequal numbers of real tokens
    targets[5, 1:] = -100
    targets[6, 4:] = -100

    def lm_loss(logits, target_rows):  # targets stay (B, T), so batches can be split into micro-batches
        return F.cross_entropy(logits, target_rows.reshape(-1), ignore_index=-100)

    loader = [(tokens[:4], targets[:4]), (tokens[4:], targets[4:])]
    exact = dense_lm_hessian(model, tokens, targets.reshape(-1),
                             lambda o, t: F.cross_entropy(o, t, ignore_index=-100))  # over all real tokens
    real_tokens = lambda x, y: int((y != -100).sum())  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batch_size_fn states the weights: no warning
        op = HVPOperator(model, loader, lm_loss, use_gpu=False, batch_size_fn=real_tokens, max_possible_gpu_samples=2)
        assert close(dense(op), exact)
    assert op.num_samples == int((targets != -100).sum())
    # the same weighting without batch_size_fn is what the warning for such a loss describes
    with pytest.warns(UserWarning, match="neither"):
        unweighted = dense(HVPOperator(model, loader, lm_loss, use_gpu=False))
    assert not close(unweighted, exact, 1e-3)


def test_a_batch_size_fn_that_does_not_add_up_over_micro_batches_is_refused():
    model = small_mlp(seed=1, width=6)
    x, y = classification_data(num=20, seed=1)
    op = HVPOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, batch_size_fn=lambda i, t: 7,
                     max_possible_gpu_samples=8)
    with pytest.raises(ValueError, match="counts 7 samples in the batch but 21 in its micro-batches"):
        op.apply(torch.zeros(op.size, dtype=torch.float64))
    with pytest.raises(TypeError, match="no batch_size_fn"):
        EmpiricalFisherOperator(model, [(x, y)], F.cross_entropy, batch_size_fn=lambda i, t: 20)
    with pytest.raises(TypeError, match="batch_size_fn must be a callable"):
        HVPOperator(model, [(x, y)], F.cross_entropy, batch_size_fn=20)


@pytest.mark.parametrize("criterion,total", [(F.cross_entropy, "mean"), (sum_function, "sum")])
def test_loss_and_gradient_follow_the_reduction(problem, criterion, total):
    model, loader, _, _ = problem
    x = torch.cat([bx for bx, _ in loader])
    y = torch.cat([by for _, by in loader])
    loss = F.cross_entropy(model(x), y, reduction=total)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])
    op = HVPOperator(model, loader, criterion, use_gpu=False, max_possible_gpu_samples=16)
    got_loss, got_grad = op.loss_and_gradient()
    assert got_loss == pytest.approx(loss.detach().item(), rel=1e-12)
    assert close(got_grad, grad, 1e-11)
    assert all(p.grad is None for p in model.parameters())


def test_a_criterion_that_fails_on_part_of_a_batch_still_works_and_is_taken_as_a_mean():
    model = small_mlp(seed=7, width=6)
    x, y = classification_data(num=32, seed=7)

    def fixed_size(outputs, targets):  # written for batches of exactly 16 samples
        return F.cross_entropy(outputs.view(16, -1), targets.view(16))

    loader = batches(x, y, [16, 16])
    op = HVPOperator(model, loader, fixed_size, use_gpu=False)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"fails on part of a batch \(RuntimeError"):
        got = op.apply(v)
    exact = dense_loss_hessian(model, F.cross_entropy, x, y)
    assert close(got, exact @ v) and op.reduction == "mean"


@pytest.mark.parametrize("make,extra", [
    (lambda m, d: HVPOperator(m, d, sum_function, use_gpu=False), 0),  # read off the product's own outputs
    (lambda m, d: GGNOperator(m, d, sum_function, use_gpu=False), 0),
    (lambda m, d: EmpiricalFisherOperator(m, d, sum_function, use_gpu=False, per_sample="loop"), 0),
    # outputs made inside torch.func transforms cannot be looked at: one forward pass of its own
    (lambda m, d: HVPOperator(m, d, sum_function, use_gpu=False, backend="forward_over_reverse"), 1),
    (lambda m, d: EmpiricalFisherOperator(m, d, sum_function, use_gpu=False, per_sample="vmap"), 1),
])
def test_finding_the_reduction_costs_at_most_one_forward_pass_once(problem, make, extra):
    model, loader, _, _ = problem
    without_gradients = []
    handle = model.register_forward_hook(lambda *_: without_gradients.append(not torch.is_grad_enabled()))
    try:
        op = make(model, loader)
        v = torch.ones(op.size, dtype=torch.float64)
        op.apply(v)
        op.apply(v)
    finally:
        handle.remove()
    assert op.reduction == "sum"
    assert sum(without_gradients) == extra
