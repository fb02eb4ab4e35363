"""Benchmark: spectral density (SLQ) with the probes one after another against probes run as blocks.

    python benchmarks/slq_blocks.py --quick --threads 1        # small: seconds on a 2-core CPU
    python benchmarks/slq_blocks.py --device cuda --gpu-sized  # the GPU-sized digits MLP
    python benchmarks/slq_blocks.py --groups 1,2,5,auto --probes 10 --steps 80

On the digits MLP of benchmarks/workloads.py (briefly trained, float32), ``spectral_density`` runs
with ``probes_per_block`` = each value of --groups ("auto": the default None, as many probes as fit
in 1 GiB of Lanczos bases). Every configuration gets its own HVPOperator and one untimed warm-up
run first (the operator's "auto" backend times its candidates on the first products of every
block width), then --repeats timed runs, of which the fastest is shown. Columns: probes per block,
wall seconds, Hessian-vector products, operator calls (one per block product), the speed-up
against the first row, the HVP backend the operator chose for that width (and whether it reused
kept graphs: spectral_density runs inside ``frozen()``), and the largest
difference of Ritz values from the first row relative to the largest |Ritz value| (rounding only,
in float32: the probes are the same vectors for every block size).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import make_workload  # noqa: E402

from hessian_eigenthings import HVPOperator, spectral_density  # noqa: E402
from hessian_eigenthings.operators.base import Operator  # noqa: E402


class CallCounter(Operator):
    """Forwards to an operator and counts its calls (a block product is one call)."""

    def __init__(self, inner: Operator) -> None:
        super().__init__(inner.size, inner.dtype, inner.device)
        self.inner = inner
        self.calls = 0

    def _matvec(self, vec: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.apply(vec)

    def _matmat(self, mat: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner.apply_block(mat)

    def frozen(self):
        """The wrapped operator's frozen() block, so that the HVPs keep their graphs."""
        return self.inner.frozen()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_config(work, group: Optional[int], args: argparse.Namespace, device: torch.device) -> dict:
    hvp = HVPOperator(work.model, work.batches, work.criterion, use_gpu=device.type == "cuda", device=device)
    op = CallCounter(hvp)
    kwargs = dict(num_probes=args.probes, num_steps=args.steps, probes_per_block=group, seed=args.seed, verbose=False)
    spectral_density(op, **kwargs)  # warm-up: the backend choice for this width
    best = None
    for _ in range(args.repeats):
        calls, products = op.calls, op.num_products
        _sync(device)
        start = time.perf_counter()
        result = spectral_density(op, **kwargs)
        _sync(device)
        seconds = time.perf_counter() - start
        if best is None or seconds < best["seconds"]:
            best = {"seconds": seconds, "products": op.num_products - products, "calls": op.calls - calls,
                    "result": result}
    width = int(best["result"].info["probes_per_block"])
    best["group"] = width
    # spectral_density runs inside frozen(), so its products reuse kept graphs where they can.
    kept = width in hvp.kept_graph_plan
    backend, batched = (hvp.kept_graph_plan if kept else hvp.backend_used).get(width, ("double_backward", False))
    best["backend"] = f"{backend}{' (batched)' if batched else ''}{', kept graphs' if kept else ''}"
    return best


def parse_groups(text: str) -> list[Optional[int]]:
    groups: list[Optional[int]] = []
    for item in text.split(","):
        item = item.strip().lower()
        groups.append(None if item == "auto" else int(item))
    return groups


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="the small MLP (width 48), trained briefly")
    parser.add_argument("--gpu-sized", action="store_true", help="the wide MLP (width 1024) of the GPU benchmark")
    parser.add_argument("--probes", type=int, default=10, help="SLQ probes (default 10)")
    parser.add_argument("--steps", type=int, default=40, help="Lanczos steps per probe (default 40)")
    parser.add_argument("--groups", default="1,auto", help="comma list of probes_per_block values, 'auto' = None")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration, fastest shown")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print("building and training the digits MLP...", file=sys.stderr, flush=True)
    work = make_workload("mlp", device, args.quick, args.gpu_sized, args.seed)
    print(f"{work.description}; n = {work.num_params} parameters; {args.probes} probes x {args.steps} steps; "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    rows = [run_config(work, group, args, device) for group in parse_groups(args.groups)]

    first = rows[0]
    ref = first["result"].ritz_values
    scale = float(np.abs(ref).max())
    header = (f"| {'probes/block':>12} | {'seconds':>8} | {'HVPs':>5} | {'calls':>5} | {'speed-up':>8} | "
              f"{'HVP backend':<38} | {'Ritz diff (rel.)':>16} |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for row in rows:
        diff = float(np.abs(row["result"].ritz_values - ref).max()) / scale
        print(f"| {row['group']:>12} | {row['seconds']:>8.3f} | {row['products']:>5} | {row['calls']:>5} | "
              f"{first['seconds'] / row['seconds']:>7.2f}x | {row['backend']:<38} | {diff:>16.2e} |")


if __name__ == "__main__":
    main()
