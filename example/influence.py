"""Influence of training samples on a test loss, against leave-one-out retraining.

Koh & Liang (2017), "Understanding Black-box Predictions via Influence Functions": for parameters
theta* minimising ``R(theta) = (1/N) sum_i l_i(theta) + (alpha/2) ||theta||^2``, the influence of
up-weighting training sample i on the test loss is ``I_i = -g_test^T H^-1 g_i`` (H the Hessian of R,
g_i the gradient of l_i, g_test that of the test loss, all at theta*). Removing sample i is
up-weighting it by -1/N, so the test loss changes by about ``-I_i / N``.

The model is an L2-regularised logistic regression on two classes of scikit-learn's digits (a few
hundred samples, float64), where R is strictly convex and the first-order prediction should be
close. One CG solve gives ``s = H^-1 g_test`` (the Hessian of the data term as an HVPOperator, the
regulariser as CG's damping alpha), and then every ``I_i = -s^T g_i``. Each leave-one-out model is
retrained by Newton's method to a gradient norm of 1e-12, so the differences of test losses
(about 1e-4) are measured exactly.

    python example/influence.py                 # CPU: a few seconds
    python example/influence.py --train 400 --classes 3 5
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from hessian_eigenthings import HVPOperator, cg


def digits_pair(first: int, second: int, train: int, test: int, seed: int):
    """Train/test inputs (with scaled pixels) and 0/1 labels for two digit classes."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = np.isin(digits.target, [first, second])
    x = torch.tensor(digits.data[keep] / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target[keep] == second, dtype=torch.float64).unsqueeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    if train + test > len(x):
        raise SystemExit(f"--train + --test must be at most {len(x)} for these two classes.")
    train_idx, test_idx = order[:train], order[train : train + test]
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def fit(x: torch.Tensor, y: torch.Tensor, alpha: float, scale: int, theta: torch.Tensor,
        weights: Optional[torch.Tensor] = None, tol: float = 1e-12) -> torch.Tensor:
    """Minimise ``(1/scale) sum_i w_i l_i(theta) + (alpha/2) ||theta||^2`` by Newton's method (exact
    dense Hessian: 65 parameters), from ``theta`` (weights then bias), to a gradient norm of ``tol``."""
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    w = torch.ones(len(x), dtype=x.dtype) if weights is None else weights
    for _ in range(100):
        p = torch.sigmoid(design @ theta)
        grad = design.T @ (w * (p - y[:, 0])) / scale + alpha * theta
        if float(grad.norm()) <= tol:
            return theta
        hess = (design * (w * p * (1 - p))[:, None]).T @ design / scale + alpha * torch.eye(len(theta), dtype=x.dtype)
        theta = theta - torch.linalg.solve(hess, grad)
    raise RuntimeError("Newton's method did not reach the gradient tolerance in 100 steps.")


def as_model(theta: torch.Tensor) -> nn.Linear:
    model = nn.Linear(len(theta) - 1, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:-1].unsqueeze(0))
        model.bias.copy_(theta[-1:])
    return model


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the comparison with command-line arguments ``argv``; returns the correlation and the scores."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs=2, default=[1, 7], help="the two digits (default 1 7)")
    parser.add_argument("--train", type=int, default=300, help="training samples (default 300)")
    parser.add_argument("--test", type=int, default=60, help="test samples (default 60)")
    parser.add_argument("--alpha", type=float, default=1e-2, help="L2 regularisation alpha (default 0.01)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=6, help="pairs printed (default 6)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: the problem is tiny, more threads only add overhead)")
    args = parser.parse_args(argv)
    if args.train < 10 or args.test < 1 or args.alpha <= 0 or args.threads < 1:
        parser.error("need --train >= 10, --test >= 1, --alpha > 0 and --threads >= 1")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    x, y, x_test, y_test = digits_pair(*args.classes, args.train, args.test, args.seed)
    n = len(x)
    bce = nn.functional.binary_cross_entropy_with_logits

    theta = fit(x, y, args.alpha, n, torch.zeros(x.shape[1] + 1, dtype=torch.float64))
    model = as_model(theta)
    with torch.no_grad():
        test_loss = float(bce(model(x_test), y_test))
    print(f"Logistic regression on digits {args.classes[0]} vs {args.classes[1]}: {n} training, {len(x_test)} test "
          f"samples, alpha = {args.alpha:g}; test loss {test_loss:.6f}.")

    params = list(model.parameters())
    g_test = torch.cat([g.reshape(-1) for g in torch.autograd.grad(bce(model(x_test), y_test), params)])
    data_hessian = HVPOperator(model, [(x, y)], bce, use_gpu=False)
    solve = cg(data_hessian, g_test, damping=args.alpha, verbose=False)  # (H_data + alpha I) s = g_test
    per_sample = torch.stack([
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(bce(model(x[i : i + 1]), y[i : i + 1]), params)])
        for i in range(n)
    ])  # (n, 65), in the model's parameter order: weight then bias, like theta
    influence = -(per_sample @ solve.x)  # I_i = -g_test^T H^-1 g_i
    predicted = -influence / n
    print(f"s = H^-1 g_test by CG: {solve.iterations} iterations, relative residual "
          f"{solve.relative_residuals[0]:.1e}, converged {solve.converged}.")

    actual = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        keep = torch.ones(n, dtype=torch.float64)
        keep[i] = 0  # the same objective without sample i's term
        retrained = fit(x, y, args.alpha, n, theta, weights=keep)
        with torch.no_grad():
            actual[i] = float(bce(as_model(retrained)(x_test), y_test)) - test_loss
    correlation = float(np.corrcoef(predicted.numpy(), actual.numpy())[0, 1])
    print(f"Leave-one-out retraining of all {n} samples (Newton to |gradient| <= 1e-12).")
    print(f"\nPearson correlation of predicted and actual changes of the test loss: {correlation:.5f}")
    order = torch.argsort(actual.abs(), descending=True)[: args.show]
    print(f"\n{'sample':>7} {'influence I_i':>14} {'predicted -I_i/N':>17} {'actual (retrained)':>19}")
    for i in order.tolist():
        print(f"{i:>7d} {float(influence[i]):>14.6f} {float(predicted[i]):>17.3e} {float(actual[i]):>19.3e}")
    return {"correlation": correlation, "predicted": predicted, "actual": actual, "cg": solve}


if __name__ == "__main__":
    main(sys.argv[1:])
