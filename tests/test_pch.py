"""The positive-curvature Hessian against dense constructions from its definition, in float64.

Two references, written independently of the operator (which differentiates the autograd graph):

* ``hbp_reference``: HBP's backpropagation of dense matrices through an MLP, over the whole
  batch (rows indexed by (sample, unit)): at the output the loss Hessian; through a Linear layer
  ``H_in = W^T H_out W`` (block diagonal over samples); through an activation
  ``H_z = diag(phi') H_a diag(phi') + m(diag(phi'' * g_a))`` with closed-form derivatives; the
  parameter blocks ``J_theta^T H_z J_theta``.
* ``unrolled_reference``: ``J^T H_out J + sum_k J_k^T m(diag(phi_k'' * g_k)) J_k`` with dense
  Jacobians of the outputs and of each activation's input w.r.t. all parameters, then the block
  diagonal; it also covers convolutions and pooling.

Both agree with the dense Hessian's diagonal blocks when the residual is kept, which checks them.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from hessian_eigenthings import GGNOperator, HVPOperator, PCHOperator, dense_matrix, hessian_trace, lanczos
from hessian_eigenthings.spectrum.api import curvature_operator
from helpers import assert_model_unchanged, batches, classification_data, dense_loss_hessian, model_snapshot

F = nn.functional
TOL = dict(rtol=1e-10, atol=1e-12)


def dense(op):
    return dense_matrix(op, verbose=False)


def modify(residual, r):
    return {"abs": r.abs(), "clip": r.clamp(min=0), "keep": r, "drop": torch.zeros_like(r)}[residual]


def derivatives(layer, z):
    """phi'(z) and phi''(z) of an activation module, in closed form."""
    if isinstance(layer, nn.Tanh):
        t = torch.tanh(z)
        return 1 - t**2, -2 * t * (1 - t**2)
    if isinstance(layer, nn.Sigmoid):
        s = torch.sigmoid(z)
        return s * (1 - s), s * (1 - s) * (1 - 2 * s)
    if isinstance(layer, nn.Softplus):
        s = torch.sigmoid(z)
        return s, s * (1 - s)
    if isinstance(layer, nn.ReLU):
        return (z > 0).to(z.dtype), torch.zeros_like(z)
    if isinstance(layer, nn.ELU):
        return torch.where(z > 0, torch.ones_like(z), torch.exp(z)), torch.where(z > 0, torch.zeros_like(z), torch.exp(z))
    raise AssertionError(type(layer))


def block_layout(model, blocks):
    """The (start, stop) ranges of the flat vector that form the blocks."""
    spans, start, owner = [], 0, None
    for name, p in model.named_parameters():
        module = name.rpartition(".")[0]
        if blocks == "module" and spans and module == owner:
            spans[-1] = (spans[-1][0], start + p.numel())
        else:
            spans.append((start, start + p.numel()))
        owner = module
        start += p.numel()
    return spans


def block_diagonal(matrix, spans):
    out = torch.zeros_like(matrix)
    for a, b in spans:
        out[a:b, a:b] = matrix[a:b, a:b]
    return out


def hbp_reference(model, x, y, criterion, residual, blocks="parameter"):
    """HBP's backpropagation of the curvature through a Sequential MLP (see the module docstring)."""
    layers = list(model)
    acts = [x]
    with torch.no_grad():
        for layer in layers:
            acts.append(layer(acts[-1]))
    out = acts[-1]
    num = out.shape[0]

    def loss_of(flat):
        return criterion(flat.view_as(out), y)

    h = torch.autograd.functional.hessian(loss_of, out.reshape(-1))
    g = torch.autograd.functional.jacobian(loss_of, out.reshape(-1))
    param_blocks = {}  # layer index -> its (weight, bias) Jacobians and the output Hessian
    for idx in reversed(range(len(layers))):
        layer, inp = layers[idx], acts[idx]
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach()
            dout, din = w.shape
            eye = torch.eye(dout, dtype=x.dtype)
            jw = torch.einsum("ik,nj->nikj", eye, inp).reshape(num * dout, dout * din)
            jb = eye.repeat(num, 1)
            param_blocks[idx] = (jw, jb, h)
            jx = torch.kron(torch.eye(num, dtype=x.dtype), w)
            h, g = jx.T @ h @ jx, jx.T @ g
        else:
            d1, d2 = derivatives(layer, inp.reshape(-1))
            h = d1[:, None] * h * d1[None, :] + torch.diag(modify(residual, d2 * g))
            g = d1 * g
    pieces = []
    for idx in sorted(param_blocks):
        jw, jb, hz = param_blocks[idx]
        if blocks == "module":
            j = torch.cat([jw, jb], dim=1)
            pieces.append(j.T @ hz @ j)
        else:
            pieces += [jw.T @ hz @ jw, jb.T @ hz @ jb]
    return torch.block_diag(*pieces)


def unrolled_reference(model, x, y, criterion, residual, blocks="parameter", names=None):
    """``J^T H_out J + sum_k J_k^T m(diag(phi_k'' g_k)) J_k``, block diagonal, for a Sequential whose
    curved layers are Tanh/Sigmoid/Softplus/ELU modules (see the module docstring)."""
    layers = list(model)
    named = [(n, p) for n, p in model.named_parameters() if names is None or n in names]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def run(flat, upto, start=None, inp=None):
        pieces, offset = {}, 0
        for name, p in named:
            pieces[name] = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        h = x if inp is None else inp
        for i in range(start or 0, upto):
            own = {k.partition(".")[2]: v for k, v in pieces.items() if k.partition(".")[0] == str(i)}
            h = functional_call(layers[i], own, (h,)) if own else layers[i](h)
        return h

    out = run(flat0, len(layers)).detach()
    jac = torch.autograd.functional.jacobian(lambda f: run(f, len(layers)).reshape(-1), flat0)
    h_out = torch.autograd.functional.hessian(lambda o: criterion(o.view_as(out), y), out.reshape(-1))
    total = jac.T @ h_out @ jac
    for k, layer in enumerate(layers):
        if not isinstance(layer, (nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU)):
            continue
        z = run(flat0, k).detach()
        a = layer(z).detach().requires_grad_(True)
        g = torch.autograd.grad(criterion(run(flat0, len(layers), start=k + 1, inp=a), y), a)[0]
        _, d2 = derivatives(layer, z)
        jk = torch.autograd.functional.jacobian(lambda f: run(f, k).reshape(-1), flat0)
        total = total + jk.T @ (modify(residual, d2 * g).reshape(-1)[:, None] * jk)
    spans = block_layout(model, blocks)
    if names is not None:  # blocks of the chosen parameters, in their own layout
        sizes = [p.numel() for _, p in named]
        starts = np.cumsum([0] + sizes)
        spans = [(int(starts[i]), int(starts[i + 1])) for i in range(len(sizes))]
    return block_diagonal(total, spans)


def mlp(seed, sizes=(4, 6, 5, 3), activations=(nn.Tanh, nn.Sigmoid)):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activations[i % len(activations)]())
    return nn.Sequential(*layers).double()


def regression_data(num, din, dout, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num, din, generator=gen, dtype=torch.float64), torch.randn(num, dout, generator=gen, dtype=torch.float64)


# -- the definition -------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", ["parameter", "module"])
@pytest.mark.parametrize("residual", ["abs", "clip", "keep", "drop"])
def test_matches_hbp_backpropagation_of_dense_matrices(residual, blocks):
    model = mlp(1, activations=(nn.Tanh, nn.Sigmoid))
    x, y = classification_data(num=24, din=4, classes=3, seed=1)
    op = PCHOperator(model, batches(x, y, [16, 8]), F.cross_entropy, use_gpu=False, residual=residual, blocks=blocks)
    got = dense(op)
    reference = hbp_reference(model, x, y, F.cross_entropy, residual, blocks)
    assert torch.allclose(got, reference, **TOL)
    assert torch.allclose(got, got.T, **TOL)
    # the same matrix from the unrolled definition
    assert torch.allclose(unrolled_reference(model, x, y, F.cross_entropy, residual, blocks), reference, **TOL)
    if residual == "keep":  # which, with the residual kept, is the dense Hessian's diagonal blocks
        hessian = dense_loss_hessian(model, F.cross_entropy, x, y)
        assert torch.allclose(reference, block_diagonal(hessian, block_layout(model, blocks)), **TOL)
    if blocks == "module":
        assert op.block_names == [("0.weight", "0.bias"), ("2.weight", "2.bias"), ("4.weight", "4.bias")]
    else:
        assert [len(b) for b in op.block_names] == [1] * 6


def test_kept_residual_gives_the_hessian_blocks_and_dropped_the_ggn_blocks():
    model = mlp(2, sizes=(4, 6, 6, 2), activations=(nn.Softplus, nn.ELU))
    x, y = regression_data(30, 4, 2, seed=2)
    loader = batches(x, y, [20, 10])
    for blocks in ("parameter", "module"):
        spans = block_layout(model, blocks)
        hessian = dense_loss_hessian(model, F.mse_loss, x, y)
        ggn = dense(GGNOperator(model, loader, F.mse_loss, use_gpu=False))
        keep = dense(PCHOperator(model, loader, F.mse_loss, use_gpu=False, residual="keep", blocks=blocks))
        drop = dense(PCHOperator(model, loader, F.mse_loss, use_gpu=False, residual="drop", blocks=blocks))
        assert torch.allclose(keep, block_diagonal(hessian, spans), **TOL)
        assert torch.allclose(drop, block_diagonal(ggn, spans), **TOL)
        assert (keep - drop).norm() > 1e-3 * keep.norm()  # the residual is really there
    # ELU's curvature and the unrolled reference agree as well
    pch = dense(PCHOperator(model, loader, F.mse_loss, use_gpu=False))
    assert torch.allclose(pch, unrolled_reference(model, x, y, F.mse_loss, "abs"), **TOL)


def test_positive_semi_definite_where_the_hessian_blocks_are_not():
    model = mlp(3, sizes=(5, 8, 8, 4), activations=(nn.Tanh, nn.Sigmoid))
    x, y = classification_data(num=40, din=5, classes=4, seed=3)
    loader = batches(x, y, [25, 15])
    hessian_blocks = dense(PCHOperator(model, loader, F.cross_entropy, use_gpu=False, residual="keep"))
    assert torch.linalg.eigvalsh(hessian_blocks)[0] < -1e-4
    for residual in ("abs", "clip"):
        values = torch.linalg.eigvalsh(dense(PCHOperator(model, loader, F.cross_entropy, use_gpu=False,
                                                         residual=residual)))
        assert values[0] >= -1e-12 * values[-1], (residual, values[0])
    abs_, clip, drop = (dense(PCHOperator(model, loader, F.cross_entropy, use_gpu=False, residual=r))
                        for r in ("abs", "clip", "drop"))
    assert (abs_ - clip).norm() > 1e-3 * abs_.norm()  # negative residuals exist, and the two treat them apart
    # abs >= clip >= keep and clip >= drop in the Loewner order (their differences are sums of
    # J^T diag(nonnegative) J), so by Weyl's inequality the sorted eigenvalues are ordered alike
    ordered = [torch.linalg.eigvalsh(m) for m in (abs_, clip, hessian_blocks, drop)]
    slack = 1e-12 * ordered[0][-1]
    assert (ordered[0] >= ordered[1] - slack).all() and (ordered[1] >= ordered[2] - slack).all()
    assert (ordered[1] >= ordered[3] - slack).all()


def test_equals_the_hessian_blocks_when_every_residual_is_positive():
    # Softplus is convex (phi'' > 0), and with positive output weights and targets below every
    # prediction dL/da > 0: every residual phi'' * dL/da is positive, so the PCH is the Hessian's blocks.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 2)).double()
    with torch.no_grad():
        model[2].weight.abs_()
    x, _ = regression_data(20, 3, 2, seed=4)
    y = model(x).detach() - 5.0
    z = model[0](x).detach()
    a = model[1](z).detach().requires_grad_(True)
    residual = torch.sigmoid(z) * (1 - torch.sigmoid(z)) * torch.autograd.grad(F.mse_loss(model[2](a), y), a)[0]
    assert residual.min() > 0
    loader = batches(x, y, [12, 8])
    hessian = dense_loss_hessian(model, F.mse_loss, x, y)
    for residual_mode in ("abs", "clip"):
        for blocks in ("parameter", "module"):
            got = dense(PCHOperator(model, loader, F.mse_loss, use_gpu=False, residual=residual_mode, blocks=blocks))
            assert torch.allclose(got, block_diagonal(hessian, block_layout(model, blocks)), **TOL)


def test_equals_the_ggn_blocks_without_curved_activations():
    # ReLU and max pooling are piecewise linear: no residual, so PCH = GGN blocks = Hessian blocks
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(12, 6), nn.LeakyReLU(0.1), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(10, 2, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    loader = batches(x, y, [6, 4])
    spans = block_layout(model, "parameter")
    ggn = block_diagonal(dense(GGNOperator(model, loader, F.cross_entropy, use_gpu=False)), spans)
    hessian = block_diagonal(dense_loss_hessian(model, F.cross_entropy, x, y), spans)
    assert torch.allclose(ggn, hessian, **TOL)
    for residual in ("abs", "clip", "keep"):
        assert torch.allclose(dense(PCHOperator(model, loader, F.cross_entropy, use_gpu=False, residual=residual)),
                              ggn, **TOL)


def test_convolutional_network_matches_the_unrolled_definition():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(8, 5), nn.Softplus(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(12, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    loader = batches(x, y, [7, 5])
    for residual in ("abs", "keep"):
        got = dense(PCHOperator(model, loader, F.cross_entropy, use_gpu=False, residual=residual))
        assert torch.allclose(got, unrolled_reference(model, x, y, F.cross_entropy, residual), **TOL)
    keep = dense(PCHOperator(model, loader, F.cross_entropy, use_gpu=False, residual="keep"))
    spans = block_layout(model, "parameter")
    assert torch.allclose(keep, block_diagonal(dense_loss_hessian(model, F.cross_entropy, x, y), spans), **TOL)


class SkipAndShared(nn.Module):
    """A residual sum, concatenation, slicing, one activation module called three times, and a
    mean over the batch broadcast back."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3), nn.Tanh()

    def forward(self, x):
        h = self.act(self.a(x))
        h = h + self.b(h)
        mixed = torch.cat([h, x], dim=1)[:, :4] * 2.0
        return self.c(self.act(mixed).mean(0, keepdim=True).expand(x.shape[0], 4) + self.act(x))


def layer_zoo(case):
    """Small models over many layer types, their inputs, targets and criterion."""
    gen = torch.Generator().manual_seed(20 + case)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    labels = torch.randint(0, 3, (6,), generator=gen)
    torch.manual_seed(20 + case)
    if case == 0:
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.MaxPool1d(2), nn.AvgPool1d(1), nn.AdaptiveAvgPool1d(2),
                              nn.Flatten(), nn.Linear(6, 3))
        return model, randn(6, 2, 8), labels, F.cross_entropy
    if case == 1:
        model = nn.Sequential(nn.ConvTranspose2d(2, 2, 2, stride=2), nn.GELU(), nn.Upsample(scale_factor=0.5, mode="bilinear"),
                              nn.ReflectionPad2d(1), nn.ZeroPad2d(1), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
        return model, randn(6, 2, 3, 3), labels, F.cross_entropy
    if case == 2:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.SiLU(), nn.PixelShuffle(2),
                              nn.Dropout2d(0.2), nn.Conv2d(1, 2, 3), nn.Mish(), nn.Flatten(), nn.Linear(8, 3))
        return model, randn(6, 2, 2, 2), labels, F.cross_entropy
    if case == 3:
        acts = [nn.ELU(), nn.CELU(), nn.SELU(), nn.LogSigmoid(), nn.Softsign(), nn.Tanhshrink(), nn.Hardswish(),
                nn.GELU(approximate="tanh")]
        layers = [nn.Linear(4, 5)]
        for act in acts:
            layers += [act, nn.Linear(5, 5)]
        layers += [nn.PReLU(), nn.ReLU6(), nn.Hardtanh(), nn.Linear(5, 2), nn.Sigmoid()]
        return nn.Sequential(*layers), randn(6, 4), torch.rand(6, 2, generator=gen, dtype=torch.float64), \
            F.binary_cross_entropy
    if case == 4:
        model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 5), nn.Softplus(), nn.Linear(5, 2))
        return model, torch.randint(0, 7, (6, 2), generator=gen), randn(6, 2), F.huber_loss
    return SkipAndShared(), randn(6, 4), labels, F.cross_entropy


@pytest.mark.parametrize("case", range(6))
def test_kept_residual_is_the_hessian_blocks_on_many_layer_types(case):
    # An operation wrongly taken as linear would leave its curvature out of "keep", and the
    # Hessian's blocks would differ; "abs" stays positive semi-definite on all of them.
    model, x, y, criterion = layer_zoo(case)
    model = model.double().eval()
    keep = dense(PCHOperator(model, [(x, y)], criterion, use_gpu=False, residual="keep"))
    hessian = dense_loss_hessian(model, criterion, x, y)
    assert torch.allclose(keep, block_diagonal(hessian, block_layout(model, "parameter")), **TOL)
    values = torch.linalg.eigvalsh(dense(PCHOperator(model, [(x, y)], criterion, use_gpu=False)))
    assert values[0] >= -1e-12 * values[-1]


# -- the operator machinery ------------------------------------------------------------------
def test_parameter_subsets_are_the_dense_blocks():
    model = mlp(7)
    x, y = classification_data(num=20, din=4, classes=3, seed=7)
    loader = batches(x, y, [14, 6])
    full = dense(PCHOperator(model, loader, F.cross_entropy, use_gpu=False))
    last = PCHOperator(model, loader, F.cross_entropy, use_gpu=False, params=["2"])
    assert last.param_names == ["2.weight", "2.bias"] and last.size == 35
    assert torch.allclose(dense(last), full[30:65, 30:65], **TOL)
    idx = torch.cat([torch.arange(24, 30), torch.arange(65, 80)])
    mixed = PCHOperator(model, loader, F.cross_entropy, use_gpu=False, params=["0.bias", "4.weight"])
    assert torch.allclose(dense(mixed), full[idx][:, idx], **TOL)
    names = ["0.bias", "4.weight"]
    assert torch.allclose(dense(mixed), unrolled_reference(model, x, y, F.cross_entropy, "abs", names=names), **TOL)


def test_batches_micro_batches_and_summed_losses_weigh_like_the_hessian():
    model = mlp(8)
    x, y = classification_data(num=33, din=4, classes=3, seed=8)
    uneven = batches(x, y, [20, 9, 4])
    whole = hbp_reference(model, x, y, F.cross_entropy, "abs")
    micro = PCHOperator(model, uneven, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=6)
    assert torch.allclose(dense(micro), whole, **TOL)
    summed = PCHOperator(model, uneven, nn.CrossEntropyLoss(reduction="sum"), use_gpu=False, max_possible_gpu_samples=6)
    assert summed.reduction == "sum"
    assert torch.allclose(dense(summed), 33 * whole, rtol=1e-10, atol=33e-12)
    # a plain function found to sum, and the Hessian operator's blocks under the same weighting
    found = PCHOperator(model, uneven, lambda o, t: F.cross_entropy(o, t, reduction="sum"), use_gpu=False,
                        residual="keep", max_possible_gpu_samples=6)
    hvp = HVPOperator(model, uneven, lambda o, t: F.cross_entropy(o, t, reduction="sum"), use_gpu=False,
                      max_possible_gpu_samples=6)
    assert torch.allclose(dense(found), block_diagonal(dense(hvp), block_layout(model, "parameter")),
                          rtol=1e-10, atol=33e-12)
    assert found.reduction == "sum"


def test_blocks_of_vectors_batched_and_one_at_a_time_agree():
    model = mlp(9)
    x, y = classification_data(num=30, din=4, classes=3, seed=9)
    loader = batches(x, y, [18, 12])
    block = torch.randn(83, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batched = PCHOperator(model, loader, F.cross_entropy, use_gpu=False)
    first = batched.apply_block(block)
    assert batched._batched is True
    single = PCHOperator(model, loader, F.cross_entropy, use_gpu=False)
    single._batched = False
    assert torch.allclose(single.apply_block(block), first, **TOL)
    assert torch.allclose(batched.apply(block[:, 3]), first[:, 3], **TOL)
    assert torch.allclose(first, hbp_reference(model, x, y, F.cross_entropy, "abs") @ block, **TOL)


def test_kept_work_gives_the_same_products_with_fewer_forward_passes():
    model = mlp(10)
    x, y = classification_data(num=30, din=4, classes=3, seed=10)
    loader = batches(x, y, [18, 12])
    calls = [0]
    handle = model.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    try:
        block = torch.randn(83, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        fresh = PCHOperator(model, loader, F.cross_entropy, use_gpu=False)
        calls[0] = 0
        expected = [fresh.apply_block(block) for _ in range(3)]
        without = calls[0]
        kept = PCHOperator(model, loader, F.cross_entropy, use_gpu=False)
        calls[0] = 0
        with kept.frozen():
            got = [kept.apply_block(block) for _ in range(3)]
        assert calls[0] == 2 and without == 6  # one forward pass per batch, instead of one per batch and product
        for a, b in zip(got, expected):
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)
    finally:
        handle.remove()


def test_model_left_unchanged_in_train_mode_with_dropout():
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    x, y = classification_data(num=20, din=4, classes=3, seed=11)
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    v = torch.randn(67, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for eval_mode in (True, False):
        op = PCHOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, eval_mode=eval_mode)
        first, second = op.apply(v), op.apply(v)
        assert torch.equal(first, second)  # the same dropout masks in every product
        assert_model_unchanged(model, before)
        assert torch.equal(torch.get_rng_state(), rng)
    assert not model._forward_hooks and not model[1]._forward_hooks  # the recording hooks are gone


def test_solvers_and_the_curvature_helpers_take_it():
    model = mlp(12, sizes=(4, 8, 3))
    x, y = classification_data(num=40, din=4, classes=3, seed=12)
    loader = batches(x, y, [25, 15])
    exact = np.linalg.eigvalsh(hbp_reference(model, x, y, F.cross_entropy, "abs").numpy())
    found = lanczos(PCHOperator(model, loader, F.cross_entropy, use_gpu=False), num_eigenthings=3, which="LA",
                    tol=1e-10, verbose=False)
    assert np.allclose(found.eigenvalues, exact[::-1][:3], rtol=1e-8)
    op = curvature_operator(model, loader, F.cross_entropy, "pch", use_gpu=False, residual="clip")
    assert isinstance(op, PCHOperator) and op.residual == "clip"
    trace = hessian_trace(model, loader, F.cross_entropy, curvature="pch", max_products=45, use_gpu=False,
                          verbose=False)
    assert abs(trace.estimate - float(exact.sum())) < 4 * trace.std_error + 1e-9


def test_reduced_precision_products_are_close_to_exact():
    torch.manual_seed(18)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    x, y = classification_data(num=20, din=4, classes=3, seed=18, dtype=torch.float32)
    v = torch.randn(83, generator=torch.Generator().manual_seed(4))
    exact = PCHOperator(model, [(x, y)], F.cross_entropy, use_gpu=False).apply(v)
    low = PCHOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, precision="bf16", reduction="mean").apply(v)
    assert low.dtype == torch.float32
    assert 0 < float((low - exact).norm() / exact.norm()) < 0.03  # bfloat16 arithmetic, not exact


# -- what is refused -------------------------------------------------------------------------
def test_unknown_options_are_refused():
    model = mlp(13)
    x, y = classification_data(num=10, din=4, classes=3, seed=13)
    with pytest.raises(ValueError, match="residual='square' is not known"):
        PCHOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, residual="square")
    with pytest.raises(ValueError, match="blocks='layer' is not known"):
        PCHOperator(model, [(x, y)], F.cross_entropy, use_gpu=False, blocks="layer")
    inplace = nn.Sequential(nn.Linear(4, 5), nn.ELU(inplace=True), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"'1' \(ELU\) runs in place.*inplace=False"):
        PCHOperator(inplace, [(x, y)], F.cross_entropy, use_gpu=False)


class Squared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * h)


class FunctionalTanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.act = nn.Linear(4, 3, bias=False), nn.Tanh()

    def forward(self, x):
        return self.act(self.enc(x)) @ self.enc.weight


class AfterActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Softplus saves its input, not its output, so autograd itself allows the in-place change
        self.a, self.act, self.b = nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3)

    def forward(self, x):
        h = self.act(self.a(x))
        h += 1.0
        return self.b(h)


def unsupported_cases():
    torch.manual_seed(14)
    return [
        (nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)), r"NativeLayerNorm in module '1'", {}),
        (nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)), r"Softmax in module '1'.*return logits", {}),
        (Squared(), r"Mul \(a function called.*both of its factors depend on a\.weight", {}),
        (FunctionalTanh(), r"Tanh \(a function called in the model's forward\).*curved in parameters of a\.weight", {}),
        (Tied(), r"both of its factors depend on enc\.weight", {}),
        (AfterActivation(), r"'act' was changed in place", {}),
        (nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)),
         r"NativeBatchNorm in module '1'.*eval_mode=True", {"eval_mode": False}),
    ]


@pytest.mark.parametrize("case", range(7))
def test_models_with_curvature_it_does_not_cover_are_refused_by_name(case):
    model, message, options = unsupported_cases()[case]
    model = model.double().train()
    x, y = classification_data(num=10, din=4, classes=3, seed=14)
    criterion = F.cross_entropy
    if isinstance(model, Tied):  # an autoencoder
        y, criterion = x, F.mse_loss
    before = model_snapshot(model)
    op = PCHOperator(model, [(x, y)], criterion, use_gpu=False, **options)
    with pytest.raises(ValueError, match=message):
        op.apply(torch.ones(op.size, dtype=torch.float64))
    assert_model_unchanged(model, before)
    assert all(not m._forward_hooks for m in model.modules())
    # without residuals it is the GGN's diagonal blocks, which every model has
    ggn = dense(GGNOperator(model, [(x, y)], criterion, use_gpu=False, **options))
    drop = dense(PCHOperator(model, [(x, y)], criterion, use_gpu=False, residual="drop", **options))
    assert torch.allclose(drop, block_diagonal(ggn, block_layout(model, "parameter")), **TOL)


def test_a_criterion_that_uses_the_parameters_directly_is_refused():
    model = mlp(15)
    x, y = classification_data(num=10, din=4, classes=3, seed=15)

    def penalised(outputs, targets):
        return F.cross_entropy(outputs, targets) + 1e-3 * model[0].weight.pow(2).sum()

    op = PCHOperator(model, [(x, y)], penalised, use_gpu=False, reduction="mean")
    with pytest.raises(ValueError, match="criterion uses a chosen parameter directly"):
        op.apply(torch.ones(op.size, dtype=torch.float64))


def test_unsupported_operations_before_the_chosen_parameters_are_constants():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = classification_data(num=16, din=4, classes=3, seed=16)
    op = PCHOperator(model, batches(x, y, [10, 6]), F.cross_entropy, use_gpu=False, params=["2", "4"])
    features = model[1](model[0](x)).detach()
    head = copy.deepcopy(nn.Sequential(model[2], model[3], model[4]))
    assert torch.allclose(dense(op), hbp_reference(head, features, y, F.cross_entropy, "abs"), **TOL)


def _distributed_rank(rank: int, folder: str) -> None:
    """One of two gloo ranks: its own uneven shard, the PCH's block product, saved for the test."""
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = mlp(19)
        x, y = classification_data(num=30, din=4, classes=3, seed=19)
        shard = batches(x[:18], y[:18], [12, 6]) if rank == 0 else batches(x[18:], y[18:], [12])
        block = torch.randn(83, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        op = PCHOperator(model, shard, F.cross_entropy, use_gpu=False, max_possible_gpu_samples=5 if rank else 100)
        torch.save({"block": op.apply_block(block), "num_samples": op.num_samples}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_uneven_shards_give_the_whole_dataset_pch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_rank, args=(str(tmp_path),), nprocs=2, join=True)
    model = mlp(19)
    x, y = classification_data(num=30, din=4, classes=3, seed=19)
    block = torch.randn(83, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    expected = hbp_reference(model, x, y, F.cross_entropy, "abs") @ block
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["num_samples"] == 30
        assert torch.allclose(out["block"], expected, **TOL)


@pytest.mark.gpu
def test_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = mlp(17)
    x, y = classification_data(num=30, din=4, classes=3, seed=17)
    block = torch.randn(83, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cpu = PCHOperator(model, [(x, y)], F.cross_entropy, use_gpu=False).apply_block(block)
    gpu_op = PCHOperator(model, [(x, y)], F.cross_entropy, use_gpu=True)
    assert gpu_op.device.type == "cuda"
    with gpu_op.frozen():
        for _ in range(2):
            assert torch.allclose(gpu_op.apply_block(block.cuda()).cpu(), cpu, **TOL)
