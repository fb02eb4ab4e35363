"""Benchmark: the error of the stochastic estimators for the same number of products.

    python benchmarks/trace_estimators.py              # the full tables (a few minutes on 2 cores)
    python benchmarks/trace_estimators.py --quick      # small problems and few seeds: seconds

For each problem and each budget of operator-vector products, every estimator runs with seeds
0 .. --seeds - 1 and the table shows the median over seeds of its relative error against the exact
value: ``|estimate - true| / |true|`` for the trace and ``||A||_F^2``, ``||d - diag(A)|| /
||diag(A)||`` for the diagonal. "cover" is the fraction of seeds whose 95% interval
(``1.96 * std_error``; per entry for the diagonal) contains the truth. Product counts and errors
are deterministic (fixed seeds, exact references), so the numbers do not depend on the machine.

Problems (float64, exact references by ``numpy.linalg.eigh`` / the dense matrix):

* ``outliers+bulk``: n = 2000, ten outliers (40 down to 4, like the class outliers of a loss
  Hessian) over a bulk of 1990 small eigenvalues, 10% of them negative.
* ``power law``: n = 2000, ``lambda_i = i^-1.5``.
* ``digits MLP``: the dense loss Hessian (by autograd) of a 64-24-10 tanh MLP trained briefly
  on scikit-learn's digits (1,810 parameters), as a ``MatrixOperator``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hessian_eigenthings import (  # noqa: E402
    MatrixOperator,
    hutchinson_diagonal,
    hutchinson_frobenius,
    hutchinson_trace,
    hutchpp_frobenius,
    hutchpp_trace,
    loss_hessian,
    xdiag,
    xtrace,
    xtrace_frobenius,
)

TRACE = {"Hutchinson": hutchinson_trace, "Hutch++": hutchpp_trace, "XTrace": xtrace}
FROBENIUS = {"Hutchinson": hutchinson_frobenius, "Hutch++": hutchpp_frobenius, "XTrace": xtrace_frobenius}
DIAGONAL = {"Hutchinson": hutchinson_diagonal, "XDiag": xdiag}


def planted(eigenvalues: np.ndarray, seed: int) -> torch.Tensor:
    """A symmetric matrix with the given spectrum and random eigenvectors."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    a = (q * torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return (a + a.T) / 2


def outliers_over_bulk(n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    outliers = np.geomspace(40.0, 4.0, 10)
    bulk = rng.gamma(0.5, 0.04, n - 10) * np.where(rng.uniform(size=n - 10) < 0.1, -0.5, 1.0)
    return planted(np.concatenate([outliers, bulk]), seed)


def power_law(n: int, seed: int = 0) -> torch.Tensor:
    return planted(np.arange(1, n + 1, dtype=np.float64) ** -1.5, seed)


def digits_mlp_hessian(width: int, epochs: int) -> torch.Tensor:
    """The dense loss Hessian of a briefly trained 64-width-10 tanh MLP on sklearn's digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return loss_hessian(model, [(x, y)], nn.functional.cross_entropy, use_gpu=False, verbose=False)


def median_errors(estimators: dict[str, Callable], a: torch.Tensor, budget: int, seeds: int, kind: str) -> dict:
    """{method: (median relative error, coverage of the 95% intervals, products used)}."""
    op = MatrixOperator(a)
    if kind == "trace":
        truth = float(a.trace())
    elif kind == "frobenius":
        truth = float((a**2).sum())
    else:
        truth = a.diagonal()
    out = {}
    for name, estimator in estimators.items():
        errors, covered, products = [], 0.0, set()
        for seed in range(seeds):
            r = estimator(op, max_products=budget, seed=seed, verbose=False)
            products.add(r.num_products)
            if kind == "diagonal":
                err = r.diagonal - truth
                errors.append(float(torch.linalg.vector_norm(err) / torch.linalg.vector_norm(truth)))
                covered += float((err.abs() <= 1.96 * r.std_error).double().mean())
            else:
                errors.append(abs(r.estimate - truth) / abs(truth))
                covered += abs(r.estimate - truth) <= 1.96 * r.std_error
        out[name] = (float(np.median(errors)), covered / seeds, sorted(products))
    return out


def table(title: str, kind: str, estimators: dict[str, Callable], problems: dict[str, torch.Tensor],
          budgets: list[int], seeds: int) -> str:
    names = list(estimators)
    lines = [f"### {title}", "",
             "| problem | n | products | " + " | ".join(f"{m} error | {m} cover" for m in names) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(names)]
    for label, a in problems.items():
        for budget in budgets:
            found = median_errors(estimators, a, budget, seeds, kind)
            used = {p for _, _, products in found.values() for p in products}
            shown = str(budget) if used == {budget} else "/".join(map(str, sorted(used)))
            cells = " | ".join(f"{found[m][0]:.2e} | {found[m][1]:.0%}" for m in names)
            lines.append(f"| {label} | {a.shape[0]} | {shown} | {cells} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 400, width-8 MLP, 5 seeds, two budgets")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 25; 5 with --quick)")
    parser.add_argument("--budgets", type=str, default=None, help="comma-separated products (default 30,100,300)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = args.seeds or (5 if args.quick else 25)
    default_budgets = [30, 100] if args.quick else [30, 100, 300]
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else default_budgets
    n = 400 if args.quick else 2000
    start = time.perf_counter()
    problems = {
        "outliers+bulk": outliers_over_bulk(n),
        "power law": power_law(n),
        "digits MLP": digits_mlp_hessian(width=8 if args.quick else 24, epochs=50 if args.quick else 200),
    }
    print(f"Median relative error over {seeds} seeds at equal products; 'cover': share of 95% intervals that "
          f"contain the truth.\n")
    print(table("Trace", "trace", TRACE, problems, budgets, seeds), end="\n\n")
    print(table("Squared Frobenius norm", "frobenius", FROBENIUS, problems, budgets, seeds), end="\n\n")
    print(table("Diagonal (relative L2 error; cover per entry)", "diagonal", DIAGONAL, problems, budgets, seeds))
    print(f"\n({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
