"""One damped Newton step (Hessian-free) on the digits MLP, against a gradient step of the same length.

The step d solves ``(G + lambda I) d = -g`` by conjugate gradients, with G the Gauss-Newton matrix
of the training loss over all of scikit-learn's digits (positive semi-definite, so CG applies) and
g the gradient: Martens (2010), "Deep learning via Hessian-free optimization". Only products with
G are used; G is never formed.

Why damping, and how it is chosen: the Newton step is the minimiser of the local quadratic model
of the loss. Where G has tiny eigenvalues that model is flat, and the undamped step is huge and
leaves the region where the model is right, so the loss can go up. Adding lambda I caps the step
in those directions (for large lambda, d -> -g / lambda: a short gradient step). The script tries a
few values of lambda, from large to small, each solve warm-started from the previous solution,
and keeps the one whose step lowers the actual loss most (a one-dimensional search on the true
loss, as Levenberg-Marquardt or trust-region methods adapt lambda). It then compares that step
with a gradient step of exactly the same length, and also solves with MINRES on the (indefinite)
Hessian with the same damping.

    python example/newton_step.py           # CPU, one thread: about 20 s
    python example/newton_step.py --epochs 40 --width 64
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
from common import add_training_options, checked_device, require_positive, train_digits_mlp  # noqa: E402

from hessian_eigenthings import GGNOperator, cg  # noqa: E402


def loss_and_gradient(model: nn.Module, loader, device: torch.device) -> tuple[float, torch.Tensor]:
    """Mean cross-entropy over every sample of ``loader`` and its gradient as one flat vector."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, grads, count = 0.0, [torch.zeros_like(p) for p in params], 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        for acc, g in zip(grads, torch.autograd.grad(loss, params)):
            acc += g
        total += float(loss.detach())
        count += len(y)
    return total / count, torch.cat([g.reshape(-1) for g in grads]) / count


def loss_after(model: nn.Module, step: torch.Tensor, loader, device: torch.device) -> float:
    """The mean loss with the parameters moved by ``step`` (the model itself is put back)."""
    original = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    try:
        nn.utils.vector_to_parameters(original + step, model.parameters())
        with torch.no_grad():
            total = sum(float(nn.functional.cross_entropy(model(x.to(device)), y.to(device), reduction="sum"))
                        for x, y in loader)
        return total / len(loader.dataset)
    finally:
        nn.utils.vector_to_parameters(original, model.parameters())


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the comparison with command-line arguments ``argv``; returns the losses it printed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dampings", type=float, nargs="+", default=[1.0, 0.3, 0.1, 0.03, 0.01, 0.003],
                        help="damping values tried, largest first (default 1 0.3 0.1 0.03 0.01 0.003)")
    parser.add_argument("--max-iters", type=int, default=250, help="CG iterations per solve (default 250)")
    add_training_options(parser, batch_size=512, epochs=10)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("max_iters", "batch_size", "epochs", "width", "threads"))
    if any(value <= 0 for value in args.dampings):
        parser.error("--dampings must be positive")
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    device = checked_device(args.device)

    model, loader, n = train_digits_mlp(args.width, args.epochs, args.batch_size, device, args.seed)
    loss0, gradient = loss_and_gradient(model, loader, device)
    print(f"Loss {loss0:.6f}, gradient norm {float(gradient.norm()):.3e}, {n} parameters.")
    options = dict(use_gpu=device.type == "cuda", device=device)
    ggn = GGNOperator(model, loader, nn.functional.cross_entropy, **options)

    print(f"\n{'damping':>9} {'CG iters':>8} {'converged':>9} {'|d|':>9} {'loss after d':>13}")
    best = None
    start = time.perf_counter()
    step = None
    with ggn.frozen():  # every solve reuses the forward passes and graphs kept inside
        for damping in sorted(args.dampings, reverse=True):
            solve = cg(ggn, -gradient, damping=damping, x0=step, rtol=1e-3, max_iters=args.max_iters,
                       verbose=not args.quiet)
            step = solve.x
            loss = loss_after(model, step, loader, device)
            print(f"{damping:>9.3g} {solve.iterations:>8d} {str(solve.converged):>9} {float(step.norm()):>9.4f} "
                  f"{loss:>13.6f}")
            if best is None or loss < best[1]:
                best = (damping, loss, step.clone(), solve)
    damping, newton_loss, newton_step, solve = best
    seconds = time.perf_counter() - start
    length = float(newton_step.norm())
    gradient_step = -length * gradient / gradient.norm()
    gradient_loss = loss_after(model, gradient_step, loader, device)
    print(f"\nBest damping {damping:g} ({seconds:.1f} s for all solves, {ggn.num_products} GGN products).")
    print(f"Newton step (GGN + {damping:g} I, CG): loss {loss0:.6f} -> {newton_loss:.6f}  (|d| = {length:.4f})")
    print(f"Gradient step of the same length:    loss {loss0:.6f} -> {gradient_loss:.6f}")

    return {"initial": loss0, "newton": newton_loss, "gradient": gradient_loss, "damping": damping}


if __name__ == "__main__":
    main()
