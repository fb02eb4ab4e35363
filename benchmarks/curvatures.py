"""The spectra of the Hessian, the GGN and the positive-curvature Hessian of one trained network.

    python benchmarks/curvatures.py --threads 1        # the table in docs/operators.md
    python benchmarks/curvatures.py --quick            # a smaller network, a smoke test
    python benchmarks/curvatures.py --timing           # also the cost of a product of each

The network is an MLP 64-32-32-10 with Tanh activations (``--activations tanh,sigmoid`` adds one
with Sigmoid activations), trained on
scikit-learn's digits (1797 samples) with Adam for a fixed number of epochs, in float64 from fixed
seeds. For each curvature matrix of its mean cross-entropy over the whole dataset the table gives
the five largest eigenvalues and the smallest one, from the dense matrix (``dense_matrix``, then
``numpy.linalg.eigvalsh``): exact, so the numbers do not depend on a solver's tolerance.

Rows: the Hessian and the GGN (full matrices); their diagonal blocks, one per parameter tensor
(``PCHOperator(residual="keep")`` and ``residual="drop"``); and the PCH with negative residuals
cast to their absolute value (``residual="abs"``, the default) or clipped to zero ("clip").

``--timing`` adds the seconds per product (one vector, and a block of 10) of each operator,
computed afresh and with kept work inside ``frozen()``: take those numbers on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hessian_eigenthings import GGNOperator, HVPOperator, PCHOperator, dense_matrix  # noqa: E402

F = nn.functional
ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def digits_batches(quick: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The digits dataset in float64, as batches of 600 (the last one shorter)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    if quick:
        x, y = x[:400], y[:400]
    return [(x[i : i + 600], y[i : i + 600]) for i in range(0, len(x), 600)]


def trained_mlp(activation: str, width: int, epochs: int, batches: list, seed: int = 0) -> nn.Module:
    """64-width-width-10 with the given activation, trained with Adam (lr 3e-3) from a fixed seed."""
    torch.manual_seed(seed)
    act = ACTIVATIONS[activation]
    model = nn.Sequential(nn.Linear(64, width), act(), nn.Linear(width, width), act(), nn.Linear(width, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    for p in model.parameters():
        p.grad = None
    return model


def operators(model: nn.Module, batches: list) -> dict:
    """The curvature operators of the table, by row label."""
    common = dict(use_gpu=False, max_possible_gpu_samples=600)
    return {
        "Hessian": HVPOperator(model, batches, F.cross_entropy, **common),
        "GGN": GGNOperator(model, batches, F.cross_entropy, **common),
        "Hessian, diagonal blocks": PCHOperator(model, batches, F.cross_entropy, residual="keep", **common),
        "GGN, diagonal blocks": PCHOperator(model, batches, F.cross_entropy, residual="drop", **common),
        "PCH, abs (default)": PCHOperator(model, batches, F.cross_entropy, residual="abs", **common),
        "PCH, clip": PCHOperator(model, batches, F.cross_entropy, residual="clip", **common),
    }


def spectrum_table(activation: str, args: argparse.Namespace) -> str:
    batches = digits_batches(args.quick)
    model = trained_mlp(activation, args.width, args.epochs, batches)
    with torch.no_grad():
        loss = sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in batches) / sum(len(y) for _, y in batches)
    n = sum(p.numel() for p in model.parameters())
    lines = [f"MLP 64-{args.width}-{args.width}-10 ({activation}), {n} parameters, trained {args.epochs} epochs "
             f"(loss {float(loss):.4f}):", "",
             "| matrix | 1st | 2nd | 3rd | 4th | 5th | smallest |", "|---|---|---|---|---|---|---|"]
    for label, op in operators(model, batches).items():
        matrix = dense_matrix(op, verbose=False)
        values = np.linalg.eigvalsh(((matrix + matrix.T) / 2).numpy())
        top = values[::-1][:5]
        lines.append(f"| {label} | " + " | ".join(f"{v:.4g}" for v in top) + f" | {values[0]:.3g} |")
    return "\n".join(lines)


def seconds_per_product(op, width: int, kept: bool, repeats: int) -> float:
    """The smallest of ``repeats`` timed products of a block of ``width`` vectors (after a warm-up)."""
    block = torch.randn(op.size, width, generator=torch.Generator().manual_seed(0), dtype=op.dtype)
    best = float("inf")
    frozen = op.frozen() if kept else _nothing()
    with frozen:
        op.apply_block(block)
        for _ in range(repeats):
            start = time.perf_counter()
            op.apply_block(block)
            best = min(best, time.perf_counter() - start)
    return best


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def timing_table(args: argparse.Namespace) -> str:
    batches = digits_batches(args.quick)
    model = trained_mlp("tanh", args.width, args.epochs, batches)
    lines = ["Seconds per product (best of %d), MLP 64-%d-%d-10 (tanh):" % (args.repeats, args.width, args.width), "",
             "| operator | b=1 | b=1, kept work | b=10 | b=10, kept work |", "|---|---|---|---|---|"]
    for label, op in operators(model, batches).items():
        cells = [seconds_per_product(op, b, kept, args.repeats) for b in (1, 10) for kept in (False, True)]
        lines.append(f"| {label} | " + " | ".join(f"{c * 1e3:.1f} ms" for c in cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a narrower network on 400 samples, few epochs")
    parser.add_argument("--activations", default="tanh", help="comma-separated: tanh, sigmoid")
    parser.add_argument("--timing", action="store_true", help="also time one product of each operator")
    parser.add_argument("--repeats", type=int, default=5, help="timed products per cell (--timing)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    args.width, args.epochs = (12, 5) if args.quick else (32, 30)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for activation in args.activations.split(","):
        print(spectrum_table(activation.strip(), args))
        print()
    if args.timing:
        print(timing_table(args))


if __name__ == "__main__":
    main()
