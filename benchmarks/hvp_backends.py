"""Cost of one Hessian-vector product relative to one gradient, per HVP backend.

For an MLP, a small CNN and a tiny GPT-style language model (generated data), this times over
the same data: one gradient (plain autograd), one product by double backward and by
forward-over-reverse, and blocks of b = 8 and 16 vectors (double backward one by one on a shared
first-order graph, batched double backward, vmapped forward-over-reverse), and prints each as a multiple of
the gradient's time, per vector. It also says which plan ``backend="auto"`` picks after its
timed trials. The "kept" columns are products inside ``Operator.frozen()`` (as every solver runs
them), which reuse each batch's forward pass and gradient graph: one backward pass per vector.

    python benchmarks/hvp_backends.py                 # CPU, torch's default thread count
    python benchmarks/hvp_backends.py --threads 1     # on a shared machine (see below)
    python benchmarks/hvp_backends.py --device cuda

Each entry is the median over ``--repeats`` of (product time / gradient time), the two timed back
to back after one warm-up, so that drift of a shared machine between entries cancels. On a machine shared with other
jobs, several OpenMP threads per process spin against each other and distort every number
(a 1 ms gradient can take 400 ms); ``--threads 1`` gives stable ratios there.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import torch
from torch import nn

from hessian_eigenthings import HVPOperator

F = nn.functional


# -- workloads ------------------------------------------------------------------------------------
def mlp_workload(device: torch.device) -> tuple[str, nn.Module, list, Callable]:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))
    x = torch.randn(1024, 64, generator=gen)
    y = torch.randint(0, 10, (1024,), generator=gen)
    return "MLP 64-128-128-10", model, [(x[i : i + 512], y[i : i + 512]) for i in (0, 512)], F.cross_entropy


def cnn_workload(device: torch.device) -> tuple[str, nn.Module, list, Callable]:
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    x = torch.randn(128, 3, 16, 16, generator=gen)
    y = torch.randint(0, 10, (128,), generator=gen)
    return "CNN 2 conv, 16x16x3", model, [(x[i : i + 64], y[i : i + 64]) for i in (0, 64)], F.cross_entropy


class TinyGPT(nn.Module):
    """Token and position embeddings, pre-norm causal attention + MLP blocks, tied head."""

    def __init__(self, vocab: int = 64, width: int = 64, heads: int = 4, layers: int = 2, context: int = 32):
        super().__init__()
        self.heads, self.width = heads, width
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.ModuleList(
            nn.ModuleDict({
                "ln1": nn.LayerNorm(width), "qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width),
                "ln2": nn.LayerNorm(width),
                "mlp": nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)),
            })
            for _ in range(layers)
        )
        self.ln = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        h = self.tok(tokens) + self.pos[:length]
        for block in self.blocks:
            q, k, v = block["qkv"](block["ln1"](h)).split(self.width, dim=-1)
            split = lambda t: t.view(batch, length, self.heads, -1).transpose(1, 2)  # noqa: E731
            att = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
            h = h + block["proj"](att.transpose(1, 2).reshape(batch, length, self.width))
            h = h + block["mlp"](block["ln2"](h))
        return self.ln(h) @ self.tok.weight.T


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def gpt_workload(device: torch.device) -> tuple[str, nn.Module, list, Callable]:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = TinyGPT()
    tokens = torch.randint(0, 64, (32, 32), generator=gen)
    return "GPT 2x64, context 32", model, [(tokens[i : i + 16], tokens[i : i + 16]) for i in (0, 16)], lm_loss


# -- timing ---------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def paired_ratio(product: Callable[[], object], gradient: Callable[[], object], repeats: int,
                 device: torch.device) -> float:
    """Median over ``repeats`` of (time of one product) / (time of one gradient), each pair timed
    back to back after one warm-up of each, so that a machine getting slower or faster between
    entries (a shared CPU) changes both alike."""
    product()
    gradient()
    ratios = []
    for _ in range(repeats):
        seconds_gradient = timed(gradient, device)
        ratios.append(timed(product, device) / seconds_gradient)
    return statistics.median(ratios)


def gradient_fn(model: nn.Module, data: list, criterion: Callable, device: torch.device) -> Callable[[], object]:
    """One full-dataset gradient, computed like the products: per batch, weighted by its size."""
    params = [p for p in model.parameters() if p.requires_grad]
    data = [(x.to(device), y.to(device)) for x, y in data]
    total = sum(len(y) for _, y in data)

    def gradient() -> list[torch.Tensor]:
        acc = [torch.zeros_like(p) for p in params]
        for x, y in data:
            grads = torch.autograd.grad(criterion(model(x), y), params)
            for a, g in zip(acc, grads):
                a.add_(g, alpha=len(y) / total)
        return acc

    return gradient


# Blocks: forward-over-reverse one vector at a time re-runs the forward pass per vector and is
# never the fastest (its single-vector cost is in the "fwd-rev x1" column), so it is left out.
PLANS = [
    ("db", "double_backward", False),
    ("db batched", "double_backward", True),
    ("fwd-rev vmap", "forward_over_reverse", True),
]


def run(device: torch.device, repeats: int, widths: tuple[int, ...]) -> None:
    header = ["workload", "params", "grad ms", "db x1", "fwd-rev x1", "kept x1"]
    for b in widths:
        header += [f"{name} b={b}" for name, _, _ in PLANS] + [f"auto b={b}", f"kept b={b}", f"kept batched b={b}"]
    rows = []
    for make in (mlp_workload, cnn_workload, gpt_workload):
        name, model, data, criterion = make(device)
        model = model.to(device)
        n = sum(p.numel() for p in model.parameters())
        model.eval()
        # The products use the batches as they are, like the gradient (no smaller micro-batches).
        largest = max(len(y) for _, y in data)
        gradient = gradient_fn(model, data, criterion, device)
        grad = statistics.median(timed(gradient, device) for _ in range(repeats))
        row = [name, f"{n:,}", f"{grad * 1e3:.2f}"]

        def ratio(backend: str, batched: bool, b: int, kept: bool = False) -> str:
            op = HVPOperator(model, data, criterion, device=device, backend=backend, batched=batched,
                             cache_graphs=kept, max_possible_gpu_samples=largest)
            block = torch.randn(n, b, generator=torch.Generator().manual_seed(b)).to(device)
            # Inside frozen() (as in every solver) the first product builds the kept graphs, and
            # paired_ratio's warm-up call is that product.
            with op.frozen():
                ratio_per_product = paired_ratio(lambda: op.apply_block(block), gradient, repeats, device)
            return f"{ratio_per_product / b:.2f}"

        row += [ratio("double_backward", False, 1), ratio("forward_over_reverse", False, 1),
                ratio("double_backward", False, 1, kept=True)]
        for b in widths:
            row += [ratio(backend, batched, b) for _, backend, batched in PLANS]
            auto = HVPOperator(model, data, criterion, device=device, max_possible_gpu_samples=largest)
            while b not in auto.backend_used:  # its first products of width b are timed trials
                auto.apply_block(torch.randn(n, b).to(device))
            row.append([label for label, backend, batched in PLANS if (backend, batched) == auto.backend_used[b]][0])
            row += [ratio("double_backward", False, b, kept=True), ratio("double_backward", True, b, kept=True)]
        rows.append(row)
        print(f"  done: {name}", flush=True)

    print(f"\nCost of one product per vector, as a multiple of one gradient ({device}, "
          f"{torch.get_num_threads()} thread(s), float32, median of {repeats} paired ratios):\n")
    widths_col = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths_col)))
    print("-|-".join("-" * w for w in widths_col))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths_col)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=7, help="timed pairs per entry (median ratio reported)")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16], help="block widths b")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("hessian_eigenthings").setLevel(logging.WARNING)
    run(torch.device(args.device), args.repeats, tuple(args.widths))


if __name__ == "__main__":
    main()
