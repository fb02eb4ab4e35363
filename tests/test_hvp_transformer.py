"""Hessian-vector products of causal transformers, whose fused attention kernels have no second
derivative: the operator runs them under the math attention backend and gets the exact Hessian."""

import math

import pytest
import torch
from torch import nn

from hessian_eigenthings import HVPOperator
from hessian_eigenthings.operators.kernels import math_attention
from helpers import assert_model_unchanged, dense_loss_hessian, model_snapshot

F = nn.functional
VOCAB, WIDTH, HEADS, CONTEXT = 11, 8, 2, 6


class CausalBlock(nn.Module):
    """A GPT-style language model: embeddings, one pre-norm attention + MLP block, a tied head."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.1 * torch.randn(CONTEXT, WIDTH))
        self.ln1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.ln2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, tokens):
        batch, length = tokens.shape
        h = self.tok(tokens) + self.pos[:length]
        q, k, v = self.qkv(self.ln1(h)).split(WIDTH, dim=-1)
        heads = lambda t: t.view(batch, length, HEADS, WIDTH // HEADS).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(batch, length, WIDTH))
        h = h + self.mlp(self.ln2(h))
        return h @ self.tok.weight.T  # (batch, length, vocab) logits


class EncoderLM(nn.Module):
    """nn.TransformerEncoder with a causal mask (nn.MultiheadAttention calls the fused kernels)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=self.tok.weight.dtype)
        return self.head(self.encoder(self.tok(tokens), mask=mask, is_causal=True))


def lm_loss(logits, tokens):
    """Next-token cross entropy, the mean over every predicted position."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def token_data(num=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (num, CONTEXT), generator=gen)
    return [(tokens[:16], tokens[:16]), (tokens[16:], tokens[16:])]


def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls().double()


# Parameters whose Hessian block goes through the attention's softmax (queries, keys, values).
SUBSET = {
    CausalBlock: ["pos", "ln1.weight", "qkv.bias", "proj.bias"],
    EncoderLM: ["encoder.layers.0.self_attn.in_proj_bias", "encoder.layers.0.norm1.weight", "head.bias"],
}
PLANS = [("double_backward", False), ("double_backward", True), ("forward_over_reverse", False),
         ("forward_over_reverse", True), ("auto", None)]


@pytest.fixture(scope="module", params=[CausalBlock, EncoderLM], ids=["gpt_block", "transformer_encoder"])
def transformer_problem(request):
    model = make(request.param).eval()
    data = token_data()
    x = torch.cat([b[0] for b in data])
    names = SUBSET[request.param]
    with math_attention():  # the reference itself needs a twice-differentiable attention
        exact = dense_loss_hessian(model, lm_loss, x, x, names=names)
    return model, data, names, exact


def test_the_default_fused_attention_cannot_be_differentiated_twice():
    """The problem this solves: a plain double backward through SDPA fails on this PyTorch."""
    model = make(CausalBlock)
    tokens = token_data()[0][0]
    loss = lm_loss(model(tokens), tokens)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    try:
        torch.autograd.grad(grads[3], model.qkv.weight, torch.ones_like(grads[3]))
    except RuntimeError as exc:
        assert "not implemented" in str(exc)
    else:
        pytest.skip("this PyTorch picks a twice-differentiable attention kernel by default on this device")


@pytest.mark.parametrize("backend,batched", PLANS)
def test_causal_transformer_products_match_the_dense_hessian(transformer_problem, backend, batched):
    model, data, names, exact = transformer_problem
    before = model_snapshot(model)
    op = HVPOperator(model, data, lm_loss, use_gpu=False, params=names, backend=backend, batched=batched,
                     max_possible_gpu_samples=10)
    block = torch.randn(op.size, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = op.apply_block(block)
    expected = exact @ block
    assert (got - expected).abs().max() <= 1e-10 * expected.abs().max()
    single = op.apply(block[:, 1])
    assert (single - expected[:, 1]).abs().max() <= 1e-10 * expected.abs().max()
    if backend != "auto":  # the forced backend really ran: nothing fell back
        assert op.backend_used[3][0] == backend and op.backend_used[1][0] == backend
        assert not op._unsupported
    assert_model_unchanged(model, before)


def test_all_parameters_of_a_gpt_block_against_plain_double_backward():
    """Every parameter (the tied embedding/head included), eval_mode=False, micro-batches: each
    column equals a textbook double backward over the whole data."""
    model = make(CausalBlock).train()
    data = token_data(num=20, seed=3)
    x = torch.cat([b[0] for b in data])
    params = list(model.parameters())
    op = HVPOperator(model, data, lm_loss, use_gpu=False, eval_mode=False, max_possible_gpu_samples=7)
    block = torch.randn(op.size, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with math_attention():
        grads = torch.autograd.grad(lm_loss(model(x), x), params, create_graph=True)
        expected = torch.stack([
            torch.cat([h.reshape(-1) for h in torch.autograd.grad(
                grads, params, [piece.view_as(p) for piece, p in zip(op.unflatten(col).values(), params)],
                retain_graph=True)])
            for col in block.T
        ], dim=1)
    for backend in ("double_backward", "forward_over_reverse", "auto"):
        got = HVPOperator(model, data, lm_loss, use_gpu=False, eval_mode=False, max_possible_gpu_samples=7,
                          backend=backend).apply_block(block)
        assert (got - expected).abs().max() <= 1e-10 * expected.abs().max(), backend


def test_the_users_attention_backend_setting_is_restored():
    model = make(CausalBlock)
    seen = []
    model.qkv.register_forward_hook(
        lambda *_: seen.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
    )
    op = HVPOperator(model, token_data(), lm_loss, use_gpu=False)
    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
              torch.backends.cuda.math_sdp_enabled())
    torch.backends.cuda.enable_math_sdp(False)  # a user who allows only the fused kernels
    try:
        op.apply(torch.ones(op.size, dtype=torch.float64))
        assert seen and all(flags == (False, True) for flags in seen)
        assert not torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    finally:
        torch.backends.cuda.enable_math_sdp(before[2])
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled()) == before


def test_top_eigenvalue_of_the_attention_block_matches_numpy(transformer_problem):
    from hessian_eigenthings import lanczos

    model, data, names, exact = transformer_problem
    top = torch.linalg.eigvalsh(exact).abs().max().item()
    op = HVPOperator(model, data, lm_loss, use_gpu=False, params=names)
    vals, _ = lanczos(op, num_eigenthings=1, verbose=False)
    assert math.isclose(abs(vals[0]), top, rel_tol=1e-8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_float32_gpt_block_on_cuda_matches_float64_cpu():
    """On a GPU the fused flash/efficient kernels would be picked for float32; products still work."""
    model64 = make(CausalBlock).eval()
    data = token_data()
    cpu = HVPOperator(model64, data, lm_loss, use_gpu=False)
    model32 = make(CausalBlock).float().cuda().eval()
    for backend in ("double_backward", "forward_over_reverse", "auto"):
        gpu = HVPOperator(model32, data, lm_loss, backend=backend)
        block = torch.randn(cpu.size, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        expected = cpu.apply_block(block)
        got = gpu.apply_block(block.float().cuda()).double().cpu()
        assert (got - expected).norm() <= 1e-4 * expected.norm()
