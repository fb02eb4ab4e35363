"""Benchmark: the memory each eigensolver itself takes, in units of the parameter count n.

    python benchmarks/solver_memory.py --quick        # n = 1M, k = 1 and 10: about a minute
    python benchmarks/solver_memory.py                # n = 5M (an MLP's size), k = 1, 10, 20
    python benchmarks/solver_memory.py --quick --root ../other-checkout   # another version, to compare

Every solve runs in a fresh process on a cheap float32 operator (a diagonal matrix with a planted
spectrum, so that a product allocates just its output), and the peak resident memory above the
level just before the solve is reported as a multiple of one float32 vector of length n (4n
bytes): that is what a solver needs beyond the operator's own memory for one product. Big
allocations are forced to ``mmap`` so that freed memory leaves the resident set at once and the
peak is the most memory held at any one time. The table also shows the library's own prediction
(``hessian_eigenthings.solver_memory``) in the same unit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("thick_restart", "block_lanczos", "lanczos", "power_iter")

CHILD = r"""
import json, resource, sys, warnings
import torch
sys.path.insert(0, {root!r})
import hessian_eigenthings as he

torch.set_num_threads(1)
n, k, mode = {n}, {k}, {mode!r}
diag = torch.linspace(-1e-3, 1e-3, n, dtype=torch.float32)
# a clear top: k + 5 eigenvalues 10 * 0.75**i, so that every solver converges in few products
diag[: k + 5] = 10 * 0.75 ** torch.arange(k + 5, dtype=torch.float32)
op = he.LambdaOperator(lambda v: diag * v, n, dtype=torch.float32,
                       apply_block_fn=lambda m: diag.unsqueeze(1) * m)
op.apply(torch.ones(n))  # touch the operator's own memory once

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

try:
    predicted = he.solver_memory(op, k, mode=mode).peak_bytes
except AttributeError:
    predicted = None
start = rss()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    kw = dict(which="LM", verbose=False)
    if mode == "power_iter":
        kw["momentum"] = 0.0
        result = he.deflated_power_iteration(op, k, power_iter_steps=1000, **kw)
    elif mode == "lanczos":
        result = he.lanczos(op, k, **kw)
    elif mode == "thick_restart":
        result = he.thick_restart_lanczos(op, k, **kw)
    else:
        result = he.block_lanczos(op, k, **kw)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"peak": peak - start, "predicted": predicted, "products": result.num_products,
                  "converged": bool(result.converged.all())}}))
"""


def measure(n: int, k: int, mode: str, root: str = ROOT) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    code = CHILD.format(root=root, n=n, k=k, mode=mode)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="n = 1M and k = 1, 10")
    parser.add_argument("--n", type=int, default=None, help="operator size (default 5,000,000; 1,000,000 with --quick)")
    parser.add_argument("--k", default=None, help="comma list of k (default 1,10,20; 1,10 with --quick)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list from {','.join(MODES)}")
    parser.add_argument("--root", default=ROOT, help="checkout of the package to measure (default: this one)")
    args = parser.parse_args()
    n = args.n or (1_000_000 if args.quick else 5_000_000)
    ks = [int(x) for x in (args.k or ("1,10" if args.quick else "1,10,20")).split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unit = 4 * n
    print(f"Solver memory above the operator's own, in float32 vectors of n = {n:,} ({unit / 2**20:.1f} MiB each).\n")
    print("| solver | k | measured peak (x 4n bytes) | predicted (x 4n bytes) | products | converged |")
    print("|---|---:|---:|---:|---:|---|")
    for mode in modes:
        for k in ks:
            out = measure(n, k, mode, args.root)
            if "error" in out:
                print(f"| {mode} | {k} | - | - | - | failed: {out['error'][:80]} |", flush=True)
                continue
            predicted = "-" if out["predicted"] is None else f"{out['predicted'] / unit:.1f}"
            print(f"| {mode} | {k} | {out['peak'] / unit:.1f} | {predicted} | {out['products']} | "
                  f"{out['converged']} |", flush=True)


if __name__ == "__main__":
    main()
