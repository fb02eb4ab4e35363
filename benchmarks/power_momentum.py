"""Benchmark: products that deflated power iteration needs with automatic momentum and without.

    python benchmarks/power_momentum.py --threads 1            # mlp, cnn, transformer; top-1 and top-10
    python benchmarks/power_momentum.py --quick                # small models, top-1 and top-5
    python benchmarks/power_momentum.py --workloads mlp --k 1,3 --cap 500

For every workload and k, ``deflated_power_iteration(op, k, momentum=None)`` (the automatic
momentum) and ``momentum=0.0`` (plain power iteration) run on the same float32 Hessian operator
with the same cap of products per eigenpair and the same relative residual tolerance (--tol). The
table gives the products each used, whether every pair converged, and the largest relative
eigenvalue error against a float64 reference (the same model and data in float64, ARPACK to 1e-10,
as in benchmarks/run.py). Product counts are deterministic, so they may be taken on a busy machine.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import make_workload  # noqa: E402

from hessian_eigenthings import HVPOperator, deflated_power_iteration, lanczos  # noqa: E402


def reference_values(work64, k: int) -> np.ndarray:
    """The k largest-magnitude eigenvalues of the float64 Hessian (ARPACK to 1e-10; k + 2 asked
    for, so that the k-th is not at the edge of ARPACK's wanted set)."""
    op = HVPOperator(work64.model, work64.batches, work64.criterion,
                     max_possible_gpu_samples=max(len(x) for x, _ in work64.batches))
    result = lanczos(op, k + 2, tol=1e-10, max_steps=200, verbose=False)
    return np.asarray(result.eigenvalues[:k], dtype=np.float64)


def solve(op: HVPOperator, k: int, momentum: Optional[float], args: argparse.Namespace) -> tuple:
    """One deflated power iteration; returns (eigenvalues, products, all converged, seconds).

    Where the solver runs a check for repeated eigenvalues after converging, it is turned off here:
    the table compares the iterations alone."""
    no_check = {"check_multiplicity": False} if "check_multiplicity" in inspect.signature(
        deflated_power_iteration).parameters else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        result = deflated_power_iteration(op, k, power_iter_steps=args.cap, power_iter_err_threshold=args.tol,
                                          momentum=momentum, seed=args.seed, verbose=False, **no_check)
        seconds = time.perf_counter() - start
    return np.asarray(result.eigenvalues, dtype=np.float64), result.num_products, bool(result.converged.all()), seconds


def relative_error(values: np.ndarray, reference: np.ndarray) -> float:
    order = np.argsort(-np.abs(values), kind="stable")
    values = values[order]
    return float(np.max(np.abs(values - reference[: len(values)]) / np.abs(reference[: len(values)])))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mlp,cnn,transformer", help="comma list of mlp, cnn, transformer")
    parser.add_argument("--k", default=None, help="comma list of eigenpair counts (default 1,10; 1,5 with --quick)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance (default 1e-4)")
    parser.add_argument("--cap", type=int, default=5000, help="most products per eigenpair, both methods (default 5000)")
    parser.add_argument("--quick", action="store_true", help="small models, top-1 and top-5, cap 1000")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    args.k = [int(v) for v in (args.k or ("1,5" if args.quick else "1,10")).split(",")]
    if args.quick and args.cap == parser.get_default("cap"):
        args.cap = 1000
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for name in args.workloads:
        if name not in ("mlp", "cnn", "transformer"):
            parser.error(f"unknown workload {name!r}; choose from mlp, cnn, transformer")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        f"Deflated power iteration, float32 Hessians, tol {args.tol:g}, cap {args.cap} products per eigenpair, "
        f"seed {args.seed}{' (quick sizes)' if args.quick else ''}. Error: largest relative eigenvalue error "
        f"against the float64 reference.", "",
        "| workload | k | plain products | adaptive products | plain / adaptive | plain converged | "
        "adaptive converged | plain error | adaptive error |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for name in args.workloads:
        print(f"{name}: building and training...", file=sys.stderr, flush=True)
        work = make_workload(name, torch.device("cpu"), args.quick, False, args.seed)
        reference = reference_values(work.in_float64(), max(args.k))
        op = HVPOperator(work.model, work.batches, work.criterion,
                         max_possible_gpu_samples=max(len(x) for x, _ in work.batches))
        for k in args.k:
            plain = solve(op, k, 0.0, args)
            adaptive = solve(op, k, None, args)
            row = (f"| {name} ({work.num_params:,} params) | {k} | {plain[1]} | {adaptive[1]} | "
                   f"{plain[1] / adaptive[1]:.2f}x | {'yes' if plain[2] else 'no'} | "
                   f"{'yes' if adaptive[2] else 'no'} | {relative_error(plain[0], reference):.1e} | "
                   f"{relative_error(adaptive[0], reference):.1e} |")
            print(f"  k={k}: plain {plain[1]} products ({plain[3]:.1f} s), adaptive {adaptive[1]} "
                  f"({adaptive[3]:.1f} s)", file=sys.stderr, flush=True)
            lines.append(row)
    table = "\n".join(lines) + "\n"
    print(table, flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
