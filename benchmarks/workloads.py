"""The benchmark's workloads: a model, its data as a list of batches on the device, and its loss.

Every workload is trained briefly (so the Hessian has the outliers of a trained network) except
the GPU-sized ResNet, which is measured at its random initialisation on random labels. All data is
generated here or ships with scikit-learn (digits); nothing is downloaded.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

F = nn.functional
WORKLOADS = ("mlp", "cnn", "transformer", "resnet")


@dataclass
class Workload:
    """A model in float32 on the device, its data and loss, and a description for the table.

    ``criterion(outputs, targets)`` is the batch-mean loss used by this package and PyHessian;
    curvlinops needs a loss module on (N, C) logits, hence ``flat_model`` / ``flat_batches``
    (the same model with token positions folded into the batch for the language model).
    """

    name: str
    model: nn.Module
    batches: list[tuple[Tensor, Tensor]]
    criterion: Callable[[Tensor, Tensor], Tensor]
    description: str

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    @property
    def num_samples(self) -> int:
        return sum(len(x) for x, _ in self.batches)

    def flat_model(self) -> nn.Module:
        return _Flatten(self.model) if self.name == "transformer" else self.model

    def flat_batches(self) -> list[tuple[Tensor, Tensor]]:
        if self.name != "transformer":
            return self.batches
        return [(x, y.reshape(-1)) for x, y in self.batches]

    def in_float64(self) -> "Workload":
        """A float64 copy (model and floating inputs): the reference operator."""
        batches = [(x.double() if x.is_floating_point() else x, y) for x, y in self.batches]
        return Workload(self.name, copy.deepcopy(self.model).double(), batches, self.criterion, self.description)


def make_workload(name: str, device: torch.device, quick: bool, gpu_sized: bool, seed: int = 0,
                  resnet_samples: int = 256) -> Workload:
    """Build (and briefly train) one workload by name; see ``WORKLOADS``. With ``quick`` and
    ``gpu_sized`` together, the GPU workloads are built at toy sizes (a smoke test of the GPU runs)."""
    builders = {"mlp": _mlp_digits, "cnn": _small_cnn, "transformer": _tiny_lm, "resnet": _resnet18}
    if name not in builders:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}.")
    torch.manual_seed(seed)
    if name == "resnet":
        return _resnet18(device, quick, gpu_sized, seed, resnet_samples)
    return builders[name](device, quick, gpu_sized, seed)


# -- the workloads ---------------------------------------------------------------------------
def _mlp_digits(device: torch.device, quick: bool, gpu_sized: bool, seed: int) -> Workload:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    width = (64 if quick else 1024) if gpu_sized else (48 if quick else 128)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10)).to(device)
    batch = 1024 if gpu_sized else 600
    batches = _split(x.to(device), y.to(device), batch)
    _train(model, batches, F.cross_entropy, epochs=10 if quick else 30, lr=3e-3)
    return Workload("mlp", model, batches, F.cross_entropy,
                    f"MLP 64-{width}-{width}-10 (ReLU) on sklearn digits, {len(x)} samples")


def _small_cnn(device: torch.device, quick: bool, gpu_sized: bool, seed: int) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    num = 512 if quick else 1024
    side = 12 if quick else 16
    coarse = torch.randn(num, 3, 4, 4, generator=gen)
    x = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    x = x + 0.3 * torch.randn(num, 3, side, side, generator=gen)
    teacher = torch.randn(10, 3 * 4 * 4, generator=gen)
    y = (F.adaptive_avg_pool2d(x, 4).reshape(num, -1) @ teacher.T).argmax(dim=1)
    channels = 8 if quick else 16
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * channels * (side // 4) ** 2, 10),
    ).to(device)
    batches = _split(x.to(device), y.to(device), 256)
    _train(model, batches, F.cross_entropy, epochs=5 if quick else 10, lr=3e-3)
    return Workload("cnn", model, batches, F.cross_entropy,
                    f"CNN 2 conv ({channels}, {2 * channels} ch) + linear on {num} generated 3x{side}x{side} images")


def _tiny_lm(device: torch.device, quick: bool, gpu_sized: bool, seed: int) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    # GPU sizes: the GPT of the H200 measurements (4 pre-norm layers, width 256, vocabulary 512,
    # 256 sequences of 128 tokens, 3.4M parameters)
    vocab = (64 if quick else 512) if gpu_sized else 32
    length = (16 if quick else 128) if gpu_sized else (16 if quick else 32)
    num = (64 if quick else 256) if gpu_sized else (64 if quick else 128)
    dim, layers, heads = ((32, 2, 2) if quick else (256, 4, 4)) if gpu_sized else ((32, 1, 2) if quick else (64, 2, 4))
    # Tokens from a sparse random Markov chain, so there is something to learn.
    successors = torch.randint(0, vocab, (vocab, 3), generator=gen)
    tokens = torch.empty(num, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (num,), generator=gen)
    for t in range(length):
        pick = torch.randint(0, 3, (num,), generator=gen)
        tokens[:, t + 1] = successors[tokens[:, t], pick]
    model = TinyGPT(vocab, length, dim, layers, heads).to(device)
    batches = _split(tokens[:, :-1].to(device), tokens[:, 1:].to(device), 64)
    _train(model, batches, lm_loss, epochs=2 if gpu_sized else (10 if quick else 20), lr=3e-3)
    return Workload("transformer", model, batches, lm_loss,
                    f"causal transformer LM, {layers} layer(s) x {dim} wide, {heads} heads, {num} generated "
                    f"sequences of {length} tokens (vocabulary {vocab})")


def _resnet18(device: torch.device, quick: bool, gpu_sized: bool, seed: int, num: int = 256) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    num = 32 if quick else num
    x = torch.randn(num, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (num,), generator=gen)
    model = ResNet18(width=8 if quick else 64).to(device)
    return Workload("resnet", model, _split(x.to(device), y.to(device), 16 if quick else 256), F.cross_entropy,
                    f"ResNet-18 (CIFAR variant{', 1/8 width' if quick else ''}, BatchNorm in eval mode), {num} random "
                    f"3x32x32 images in batches of {16 if quick else 256}, random labels")


# -- models ------------------------------------------------------------------------------------
def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross entropy over every position: logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class CausalSelfAttention(nn.Module):
    """Attention written out (matmul, mask, softmax): it has double-backward on every device,
    unlike fused scaled_dot_product_attention kernels."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        weights = scores.masked_fill(mask, float("-inf")).softmax(dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """A GPT-style decoder: token and position embeddings, pre-norm blocks, a linear head."""

    def __init__(self, vocab: int, length: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(0.02 * torch.randn(length, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tokens(idx) + self.positions[: idx.shape[1]]
        return self.head(self.norm(self.blocks(x)))


class _Flatten(nn.Module):
    """(B, T, V) logits as (B * T, V), for losses that want (N, C)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        return out.reshape(-1, out.shape[-1])


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool): about 11.2M parameters."""

    def __init__(self, classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, cin = [], width
        for cout, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(8 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


# -- helpers -----------------------------------------------------------------------------------
def _split(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def _train(model: nn.Module, batches: list, criterion: Callable, epochs: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None
    model.eval()
