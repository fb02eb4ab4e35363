"""Train a small MLP on scikit-learn's digits and print the top Hessian eigenvalues.

    python example/main.py                      # power iteration and ARPACK Lanczos, top 10, CPU, a few seconds
    python example/main.py --mode auto          # one mode of compute_hessian_eigenthings
    python example/main.py --k 5 --mode lanczos --which LA --device cuda --batch-size 256

--mode both runs power iteration and ARPACK Lanczos one after the other; any other choice is a mode
of compute_hessian_eigenthings. The digits dataset ships inside scikit-learn, so nothing is
downloaded (pip install -e ".[examples]").
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

from common import HelpFormatter, add_training_options, print_eigenpairs, solver_modes, train_digits_mlp  # example/common.py
from hessian_eigenthings import compute_hessian_eigenthings


def report(name: str, result, seconds: float) -> None:
    """Print a solver's name, cost and time, then its eigenpairs."""
    print(f"\n{name}: {result.num_products} Hessian-vector products, {seconds:.2f} s")
    print_eigenpairs(result)


def mode_options(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The solver options of one mode: power iteration's step cap, tolerance and momentum, or the
    relative residual tolerance of the Lanczos solvers (ARPACK at most 1e-6, as this script always did)."""
    if mode == "power_iter":
        return dict(power_iter_steps=args.power_iter_steps, power_iter_err_threshold=args.tol, momentum=args.momentum)
    return dict(tol=min(args.tol, 1e-6) if mode == "lanczos" else args.tol)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Train, then solve with the chosen mode(s); ``argv`` defaults to the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--k", type=int, default=10, help="number of eigenpairs")
    parser.add_argument("--mode", choices=["both", *solver_modes()], default="both",
                        help="both: power_iter then lanczos; otherwise a mode of compute_hessian_eigenthings")
    parser.add_argument("--which", choices=["LM", "LA", "SA"], default="LM",
                        help="which end of the spectrum: largest magnitude, largest, smallest")
    add_training_options(parser)
    parser.add_argument("--power-iter-steps", type=int, default=1000, help="power iteration steps per pair")
    parser.add_argument("--momentum", type=float, default=0.0, help="power iteration momentum (beta)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialization and training")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (1 is enough for this small MLP; see the FAQ on threads)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Products of a 3.5k-parameter MLP are too small to share between threads; on a machine whose
    # cores are busy, torch's default of one thread per core made this script ~10x slower.
    torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    model, loader, _ = train_digits_mlp(args.width, args.epochs, args.batch_size, device, args.seed)

    options = dict(num_eigenthings=args.k, use_gpu=device.type == "cuda", device=device, which=args.which,
                   verbose=not args.quiet)
    for mode in ("power_iter", "lanczos") if args.mode == "both" else (args.mode,):
        start = time.perf_counter()
        result = compute_hessian_eigenthings(
            model, loader, nn.functional.cross_entropy, mode=mode, **mode_options(mode, args), **options
        )
        report(mode, result, time.perf_counter() - start)


if __name__ == "__main__":
    main()
