"""Linear solves with a model's curvature: one block solve against one solve per right-hand side,
and a diagonal preconditioner.

For the benchmark's MLP (digits) and CNN workloads, this solves ``(G + lambda I) X = B`` by CG
with the GGN G and m random right-hand sides, and ``(H + lambda I) X = B`` by MINRES with the
Hessian H, each way: m separate solves, one block solve (one block product per iteration for all
running columns), and the block solve preconditioned by the exact GGN diagonal plus lambda
(``ggn_diagonal``; its cost is included). It prints products, the largest iteration count, the
largest final relative residual and the time, median of ``--repeats``. Product counts are
deterministic; times need an otherwise idle machine.

    python benchmarks/linsolve.py --quick             # a check that it runs
    python benchmarks/linsolve.py --threads 1 --rhs 8
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch

from hessian_eigenthings import ConvergenceWarning, GGNOperator, HVPOperator, cg, ggn_diagonal, minres
from workloads import make_workload


def timed(fn, repeats):
    result, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small models, one repeat: checks that it runs")
    parser.add_argument("--rhs", type=int, default=None, help="right-hand sides (default 8, quick 2)")
    parser.add_argument("--max-iters", type=int, default=None,
                        help="iterations per column (default 500, quick 40): the damped Hessian of a ReLU network "
                             "is nearly singular, and MINRES would otherwise run for a long time")
    parser.add_argument("--damping", type=float, default=1e-2, help="lambda (default 0.01)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rhs = args.rhs or (2 if args.quick else 8)
    args.max_iters = args.max_iters or (40 if args.quick else 500)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore", ConvergenceWarning)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), {args.rhs} right-hand "
          f"sides, damping {args.damping:g}, at most {args.max_iters} iterations, median of {args.repeats} "
          f"run(s){' (quick)' if args.quick else ''}\n")
    for name in args.workloads:
        work = make_workload(name, device, args.quick, False, args.seed)
        options = dict(use_gpu=device.type == "cuda", max_possible_gpu_samples=4096)
        gen = torch.Generator().manual_seed(args.seed)
        print(f"### {work.description}: {work.num_params} parameters\n")
        print("| system | how | products | max iterations | max relative residual | seconds |")
        print("|---|---|---|---|---|---|")
        for label, operator, solver in (
            ("GGN, CG", GGNOperator(work.model, work.batches, work.criterion, **options), cg),
            ("Hessian, MINRES", HVPOperator(work.model, work.batches, work.criterion, **options), minres),
        ):
            rhs = torch.randn(operator.size, args.rhs, generator=gen).to(device=operator.device, dtype=operator.dtype)

            def separate():
                results = [solver(operator, rhs[:, j], damping=args.damping, max_iters=args.max_iters,
                                  verbose=False) for j in range(args.rhs)]
                return (sum(r.num_products for r in results), max(r.iterations for r in results),
                        max(float(r.relative_residuals.max()) for r in results))

            def block():
                r = solver(operator, rhs, damping=args.damping, max_iters=args.max_iters, verbose=False)
                return r.num_products, r.iterations, float(r.relative_residuals.max())

            def preconditioned():
                diagonal = ggn_diagonal(work.model, work.batches, work.criterion, verbose=False, **options).diagonal
                r = solver(operator, rhs, damping=args.damping, preconditioner=diagonal + args.damping,
                           max_iters=args.max_iters, verbose=False)
                return r.num_products, r.iterations, float(r.relative_residuals.max())

            for how, fn in (("one solve per column", separate), ("one block solve", block),
                            ("block, GGN-diagonal preconditioner", preconditioned)):
                seconds, (products, iterations, residual) = timed(fn, args.repeats)
                print(f"| {label} | {how} | {products} | {iterations} | {residual:.1e} | {seconds:.2f} |")
        print()


if __name__ == "__main__":
    main()
