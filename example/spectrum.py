"""The spectrum of a trained MLP's loss Hessian on scikit-learn's digits: top eigenvalues, trace
with its standard error, and the spectral density (stochastic Lanczos quadrature) saved as a PNG.

    python example/spectrum.py                          # CPU, one thread: about 15 s
    python example/spectrum.py --out density.png --probes 20 --steps 100 --ggn

The digits dataset ships inside scikit-learn, so nothing is downloaded. Needs matplotlib for the
figure (pip install -e ".[examples]").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HelpFormatter, add_training_options, checked_device, require_positive, train_digits_mlp  # noqa: E402

from hessian_eigenthings import compute_hessian_eigenthings, hessian_density, hessian_trace  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the analysis with command-line arguments ``argv`` (default: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default="hessian_spectrum.png",
                        help="where to save the density plot (a path relative to the current directory)")
    parser.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    parser.add_argument("--probes", type=int, default=10, help="SLQ start vectors")
    parser.add_argument("--steps", type=int, default=80, help="Lanczos steps per SLQ probe")
    parser.add_argument("--trace-products", type=int, default=150, help="Hutch++ product budget")
    parser.add_argument("--ggn", action="store_true", help="also draw the Gauss-Newton density on the same axes")
    add_training_options(parser)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (the model is small: extra threads only add overhead, a lot of "
                             "it on a busy machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, probes and start vectors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    require_positive(parser, args,
                     ("k", "probes", "steps", "trace_products", "batch_size", "epochs", "width", "threads"))
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    device = checked_device(args.device)
    model, loader, n = train_digits_mlp(args.width, args.epochs, args.batch_size, device, args.seed)
    options = dict(use_gpu=device.type == "cuda", device=device, verbose=not args.quiet)
    criterion = nn.functional.cross_entropy

    start = time.perf_counter()
    top = compute_hessian_eigenthings(model, loader, criterion, num_eigenthings=args.k, mode="lanczos",
                                      which="LA", **options)
    print(f"\nTop {args.k} Hessian eigenvalues ({top.num_products} products, {time.perf_counter() - start:.1f} s):")
    for i, (val, rel) in enumerate(zip(top.eigenvalues, top.relative_residuals)):
        print(f"  {i:>2}  {val:12.6f}   (relative residual {rel:.1e})")

    start = time.perf_counter()
    trace = hessian_trace(model, loader, criterion, method="hutch++", max_products=args.trace_products,
                          seed=args.seed, **options)
    low, high = trace.confidence_interval()
    print(f"\nHessian trace (Hutch++, {trace.num_products} products, {time.perf_counter() - start:.1f} s): "
          f"{trace.estimate:.4f} +- {trace.std_error:.4f} (95% interval [{low:.4f}, {high:.4f}])")

    start = time.perf_counter()
    density = hessian_density(model, loader, criterion, num_probes=args.probes, num_steps=args.steps,
                              seed=args.seed, **options)
    lo, hi = density.extremes
    slq_trace = density.trace()
    print(f"\nSpectral density (SLQ, {density.num_products} products, {time.perf_counter() - start:.1f} s): "
          f"Ritz values in [{lo:.4f}, {hi:.4f}], integral {density.integral():.6f}, "
          f"implied trace {slq_trace.estimate:.4f} +- {slq_trace.std_error:.4f}")
    print(f"  largest Ritz value {hi:.6f} vs top eigenvalue {top.eigenvalues[0]:.6f}")

    try:
        fig = density.plot(label="Hessian" if args.ggn else None,
                           title=f"Hessian spectrum of a {n}-parameter MLP on digits")
    except ImportError as exc:
        print(f"\nNo plot: {exc}")
        return
    if args.ggn:
        ggn = hessian_density(model, loader, criterion, curvature="ggn", num_probes=args.probes,
                              num_steps=args.steps, seed=args.seed, sigma=density.sigma, grid=density.grid, **options)
        print(f"GGN density: Ritz values in [{ggn.extremes[0]:.4f}, {ggn.extremes[1]:.4f}] (PSD)")
        ggn.plot(ax=fig.axes[0], label="Gauss-Newton", show_extremes=False,
                 title=f"Hessian and GGN spectra of a {n}-parameter MLP on digits")
    fig.savefig(args.out, dpi=150)
    print(f"\nSaved the density plot to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
