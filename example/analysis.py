"""A whole curvature analysis of a trained MLP on scikit-learn's digits, on one ``Hessian`` object:
top eigenvalues, trace, the spectral densities of the Hessian and the Gauss-Newton matrix, the
per-layer table, and the loss along the sharpest direction and on the plane of the two sharpest.

    python example/analysis.py                        # CPU, one thread: about 30 s
    python example/analysis.py --out-dir figures --landscape random --grid 31

Every call reads the data from the object's cache (the dataloader is read once) and, inside the
``with`` block, reuses each batch's forward pass and gradient graph. Writes four PNG files to
--out-dir: density.png, layers.png, landscape_1d.png and landscape.png. The digits dataset ships inside
scikit-learn, so nothing is downloaded. Needs matplotlib (pip install -e ".[examples]").
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
from common import (  # noqa: E402
    CountingLoader,
    HelpFormatter,
    add_training_options,
    checked_device,
    print_eigenpairs,
    require_positive,
    train_digits_mlp,
)

from hessian_eigenthings import Hessian  # noqa: E402


def layer_groups(model: nn.Module) -> dict[str, str]:
    """One group per linear layer, labelled by its shape: {"0 (64->32)": "0", ...}."""
    return {f"{name} ({m.in_features}->{m.out_features})": name
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the analysis with command-line arguments ``argv`` (default: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out-dir", default=".",
                        help="folder for density.png, layers.png, landscape_1d.png and landscape.png")
    parser.add_argument("--k", type=int, default=5, help="number of top eigenvalues (largest algebraic)")
    parser.add_argument("--trace-products", type=int, default=102, help="Hutch++ product budget of the trace")
    parser.add_argument("--probes", type=int, default=8, help="SLQ start vectors of each density")
    parser.add_argument("--steps", type=int, default=60, help="Lanczos steps per SLQ probe")
    parser.add_argument("--layer-products", type=int, default=102,
                        help="product budget of each per-layer trace and Frobenius estimate")
    parser.add_argument("--landscape", choices=["eigen", "random"], default="eigen",
                        help="plane of the landscape: the top two eigenvectors, or two filter-normalised random "
                             "directions (Li et al., 2018)")
    parser.add_argument("--grid", type=int, default=21, help="landscape grid points per axis")
    add_training_options(parser)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (the model is small: extra threads only add overhead)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, probes and random directions")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("k", "trace_products", "probes", "steps", "layer_products", "grid",
                                    "batch_size", "epochs", "width", "threads"))
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit('The figures need matplotlib: pip install -e ".[examples]" (or pip install matplotlib).')
    os.makedirs(args.out_dir, exist_ok=True)

    device = checked_device(args.device)
    model, loader, n = train_digits_mlp(args.width, args.epochs, args.batch_size, device, args.seed)
    loader = CountingLoader(loader)
    start = time.perf_counter()
    with Hessian(model, loader, nn.functional.cross_entropy, use_gpu=device.type == "cuda", device=device,
                 verbose=not args.quiet) as hessian:
        top = hessian.eigenvalues(args.k, which="LA", seed=args.seed)
        print(f"\nTop {args.k} Hessian eigenvalues ({top.num_products} products):")
        print_eigenpairs(top)

        trace = hessian.trace(max_products=args.trace_products, seed=args.seed)
        print(f"\nHessian trace (Hutch++, {trace.num_products} products): {trace.estimate:.4f} "
              f"+- {trace.std_error:.4f}")

        density = hessian.density(args.probes, args.steps, seed=args.seed)
        ggn_density = hessian.ggn().density(args.probes, args.steps, seed=args.seed, sigma=density.sigma,
                                            grid=density.grid)
        print(f"Spectral densities (SLQ): Hessian Ritz values in [{density.extremes[0]:.4f}, "
              f"{density.extremes[1]:.4f}], Gauss-Newton in [{ggn_density.extremes[0]:.4f}, "
              f"{ggn_density.extremes[1]:.4f}]")

        table = hessian.per_layer(layer_groups(model), curvatures=("hessian", "ggn"),
                                  max_products=args.layer_products, seed=args.seed)
        print("\nPer-layer blocks (each layer's own curvature, the other layers held fixed):")
        print(table)
        block_traces = sum(row.trace for row in table if row.curvature == "hessian")
        print(f"The Hessian blocks' traces add up to {block_traces:.4f} (the whole trace: {trace.estimate:.4f}).\n"
              f"With ReLUs the outputs are piecewise linear in each layer's own weights, so each Hessian block equals\n"
              f"its Gauss-Newton block; the matrices differ only between layers: the Hessian's smallest Ritz value\n"
              f"is {density.extremes[0]:.4f}, the Gauss-Newton matrix's {ggn_density.extremes[0]:.4f} (it has no "
              f"negative eigenvalue).")

        curve = hessian.landscape_1d(0, steps=args.grid)
        print(f"\nLoss along the top eigenvector (lambda = {curve.eigenvalue:.4f}) at {args.grid} steps up to "
              f"+-{curve.alphas[-1]:.3g}: {curve.losses[0]:.4f} / {curve.loss0:.4f} / {curve.losses[-1]:.4f} "
              f"(quadratic model: {curve.quadratic()[0]:.4f} / {curve.loss0:.4f} / {curve.quadratic()[-1]:.4f})")

        directions = (0, 1) if args.landscape == "eigen" else ("random", "random")
        surface = hessian.landscape_2d(directions, steps=args.grid, seed=args.seed)
        corner = surface.losses[-1, -1]
        print(f"Loss landscape on {args.grid} x {args.grid} points ({args.landscape} directions): loss "
              f"{surface.loss0:.4f} here, {corner:.4f} at the corner (+{surface.alphas[-1]:.3g}, "
              f"+{surface.betas[-1]:.3g}), where the quadratic model says {surface.quadratic()[-1, -1]:.4f}")
    print(f"\nThe analysis took {time.perf_counter() - start:.1f} s and read the dataloader {loader.passes} time(s).")

    title = f"{n}-parameter MLP on digits"
    fig = density.plot(label="Hessian", title=f"Spectral density of a {title}")
    ggn_density.plot(ax=fig.axes[0], label="Gauss-Newton", show_extremes=False,
                     title=f"Spectral densities of a {title} (SLQ)")
    fig.axes[0].lines[-1].set_linestyle("--")
    fig.axes[0].legend()
    paths = {name: os.path.join(args.out_dir, f"{name}.png")
             for name in ("density", "layers", "landscape_1d", "landscape")}
    fig.savefig(paths["density"], dpi=150)
    table.plot(paths["layers"], title=f"Diagonal blocks of the curvature of a {title}")
    curve.plot(paths["landscape_1d"], title=f"Loss of a {title} along its sharpest direction")
    surface.plot(paths["landscape"], title=f"Loss of a {title} (dashed: quadratic model)")
    for path in paths.values():
        print(f"Saved {os.path.abspath(path)}")


if __name__ == "__main__":
    main()
