"""Train a small MLP on scikit-learn's digits and print the top Hessian eigenvalues.

    python example/main.py                      # both solvers, top 10, CPU, a few seconds
    python example/main.py --k 5 --mode lanczos --which LA --device cuda --batch-size 256

The digits dataset ships inside scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch import nn

from common import add_training_options, print_eigenpairs, train_digits_mlp  # example/common.py
from hessian_eigenthings import compute_hessian_eigenthings


def report(name: str, result, seconds: float) -> None:
    """Print a solver's name, cost and time, then its eigenpairs."""
    print(f"\n{name}: {result.num_products} Hessian-vector products, {seconds:.2f} s")
    print_eigenpairs(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=10, help="number of eigenpairs (default 10)")
    parser.add_argument("--mode", choices=["both", "power_iter", "lanczos"], default="both")
    parser.add_argument("--which", choices=["LM", "LA", "SA"], default="LM", help="which end of the spectrum")
    add_training_options(parser)
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

    device = torch.device(args.device)
    model, loader, _ = train_digits_mlp(args.width, args.epochs, args.batch_size, device, args.seed)

    options = dict(num_eigenthings=args.k, use_gpu=device.type == "cuda", device=device, which=args.which,
                  verbose=not args.quiet)
    if args.mode in ("both", "power_iter"):
        start = time.perf_counter()
        result = compute_hessian_eigenthings(
            model, loader, nn.functional.cross_entropy, mode="power_iter", power_iter_steps=args.power_iter_steps,
            power_iter_err_threshold=args.tol, momentum=args.momentum, **options,
        )
        report("power_iter", result, time.perf_counter() - start)
    if args.mode in ("both", "lanczos"):
        start = time.perf_counter()
        result = compute_hessian_eigenthings(
            model, loader, nn.functional.cross_entropy, mode="lanczos", tol=min(args.tol, 1e-6), **options
        )
        report("lanczos", result, time.perf_counter() - start)


if __name__ == "__main__":
    main()
