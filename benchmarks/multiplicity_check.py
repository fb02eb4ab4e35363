"""Benchmark: what the multiplicity check costs after a converged solve, on the benchmark workloads.

    python benchmarks/multiplicity_check.py --threads 1          # mlp, cnn, transformer; top-1 and top-10
    python benchmarks/multiplicity_check.py --quick              # small models, top-1 and top-5

For every workload, k and solver (thick_restart, lanczos), the solve runs first; then
``complete_multiplicities`` checks its pairs. The table gives the products of the solve and of the
check, the check's share, how many pairs it added, and the bound it reached on the probability of
having overlooked an eigenvalue beyond the k-th. Product counts are deterministic.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import warnings
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import make_workload  # noqa: E402

from hessian_eigenthings import HVPOperator, lanczos, thick_restart_lanczos  # noqa: E402
from hessian_eigenthings.solvers.verify import complete_multiplicities  # noqa: E402

SOLVERS = {"thick_restart": thick_restart_lanczos, "lanczos": lanczos}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mlp,cnn,transformer", help="comma list of mlp, cnn, transformer")
    parser.add_argument("--k", default=None, help="comma list of eigenpair counts (default 1,10; 1,5 with --quick)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance (default 1e-4)")
    parser.add_argument("--quick", action="store_true", help="small models, top-1 and top-5")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.k = [int(v) for v in (args.k or ("1,5" if args.quick else "1,10")).split(",")]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        f"Multiplicity check after a converged solve, float32 Hessians, tol {args.tol:g}, seed {args.seed}"
        f"{' (quick sizes)' if args.quick else ''}.", "",
        "| workload | k | solver | solve products | check products | check / solve | pairs added | "
        "miss probability bound |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name in args.workloads:
        print(f"{name}: building and training...", file=sys.stderr, flush=True)
        work = make_workload(name, torch.device("cpu"), args.quick, False, args.seed)
        op = HVPOperator(work.model, work.batches, work.criterion,
                         max_possible_gpu_samples=max(len(x) for x, _ in work.batches))
        for k in args.k:
            for solver, solve in SOLVERS.items():
                # the raw solve: where the solver runs this check itself, it is turned off here
                no_check = {"check_multiplicity": False} if "check_multiplicity" in inspect.signature(
                    solve).parameters else {}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = solve(op, k, tol=args.tol, seed=args.seed, verbose=False, **no_check)
                values = torch.as_tensor(result.eigenvalues, dtype=op.dtype)
                vectors = torch.as_tensor(result.eigenvectors, dtype=op.dtype).T.contiguous()
                with op.frozen():
                    done = complete_multiplicities(op, values, vectors, "LM", args.tol, args.seed)
                lines.append(
                    f"| {name} | {k} | {solver} | {result.num_products} | {done.num_products} | "
                    f"{done.num_products / result.num_products:.0%} | {done.missed} | {done.miss_probability:.1e} |"
                )
                print("  " + lines[-1], file=sys.stderr, flush=True)
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
