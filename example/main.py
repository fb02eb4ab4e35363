"""Train a small MLP on scikit-learn's digits and print the top Hessian eigenvalues.

    python example/main.py                      # both solvers, top 10, CPU, a few seconds
    python example/main.py --k 5 --mode lanczos --which LA --device cuda --batch-size 256

The digits dataset ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch
from torch import nn

from hessian_eigenthings import compute_hessian_eigenthings


def digits_loaders(batch_size: int, device: str) -> torch.utils.data.DataLoader:
    """The 1797 digits images (8x8, scaled to [0, 1]) and labels as a DataLoader."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    targets = torch.tensor(digits.target, dtype=torch.long)
    dataset = torch.utils.data.TensorDataset(inputs, targets)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def make_mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def train(model: nn.Module, loader: torch.utils.data.DataLoader, epochs: int, device: torch.device) -> float:
    """A few epochs of Adam; returns the last epoch's mean training loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            count += len(y)
    return total / count


def report(name: str, vals: np.ndarray, result, seconds: float) -> None:
    print(f"\n{name}: {result.num_products} Hessian-vector products, {seconds:.2f} s")
    print(f"{'#':>3} {'eigenvalue':>14} {'||Hv - lv||':>12} {'relative':>10}")
    for i, (val, res, rel) in enumerate(zip(vals, result.residuals, result.relative_residuals)):
        print(f"{i:>3} {val:>14.6f} {res:>12.3e} {rel:>10.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=10, help="number of eigenpairs (default 10)")
    parser.add_argument("--mode", choices=["both", "power_iter", "lanczos"], default="both")
    parser.add_argument("--which", choices=["LM", "LA", "SA"], default="LM", help="which end of the spectrum")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, default=512, help="batch size for training and products")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs before the analysis")
    parser.add_argument("--width", type=int, default=32, help="hidden width of the MLP")
    parser.add_argument("--power-iter-steps", type=int, default=1000, help="power iteration steps per pair")
    parser.add_argument("--momentum", type=float, default=0.0, help="power iteration momentum (beta)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: enough for this small MLP)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Products of a 3.5k-parameter MLP are too small to share between threads; on a machine whose
    # cores are busy, torch's default of one thread per core made this script ~10x slower.
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    loader = digits_loaders(args.batch_size, args.device)
    model = make_mlp(args.width).to(device)
    start = time.perf_counter()
    loss = train(model, loader, args.epochs, device)
    n = sum(p.numel() for p in model.parameters())
    print(f"Trained an MLP with {n} parameters on digits for {args.epochs} epochs "
          f"({time.perf_counter() - start:.1f} s), training loss {loss:.4f}.")

    common = dict(num_eigenthings=args.k, use_gpu=device.type == "cuda", device=device, which=args.which,
                  verbose=not args.quiet)
    if args.mode in ("both", "power_iter"):
        start = time.perf_counter()
        result = compute_hessian_eigenthings(
            model, loader, nn.functional.cross_entropy, mode="power_iter", power_iter_steps=args.power_iter_steps,
            power_iter_err_threshold=args.tol, momentum=args.momentum, **common,
        )
        report("power_iter", result.eigenvalues, result, time.perf_counter() - start)
    if args.mode in ("both", "lanczos"):
        start = time.perf_counter()
        result = compute_hessian_eigenthings(
            model, loader, nn.functional.cross_entropy, mode="lanczos", tol=min(args.tol, 1e-6), **common
        )
        report("lanczos", result.eigenvalues, result, time.perf_counter() - start)


if __name__ == "__main__":
    main()
