"""Benchmark: top eigenvalues + trace + spectral density on one ``Hessian`` object against the three
one-call helpers in a row (``compute_hessian_eigenthings``, ``hessian_trace``, ``hessian_density``).

    python benchmarks/shared_analysis.py --quick --threads 1     # a smoke test: seconds on a 2-core CPU
    python benchmarks/shared_analysis.py --threads 1 --repeats 3
    python benchmarks/shared_analysis.py --workload cnn --batch-size 32 --decode-ms 0

On a workload of benchmarks/workloads.py (briefly trained, float32), the data is handed over as a
torch DataLoader over its samples (``--batch-size``), as a user would pass it; ``--decode-ms`` adds
that many milliseconds of waiting to every batch the DataLoader makes, a stand-in for reading and
decoding images from disk (one table per value; 0 is the in-memory dataset as it is). The same analysis
(the same solver, estimators, budgets and seeds) runs three ways:

* ``helpers``: the three one-call helpers, each building its own operator, reading the dataloader
  and building every batch's forward pass and gradient graph for itself;
* ``Hessian``: one object, three calls: the batches are read once and kept on the device, each
  call builds the graphs once;
* ``with Hessian``: the same inside ``with``: the graphs are built once for all three calls.

Columns: Hessian-vector products, forward passes of the model (counted by a hook: the graph
builds, plus the reduction probe's passes if any), passes over the dataloader, wall seconds (the
fastest of --repeats runs, each on a fresh operator), the saving against the helpers, and the
largest difference of the numbers (top eigenvalue, trace, largest Ritz value) from the helpers'
relative to their size (rounding only: the products are the same). Below each table, the parts
the saving is made of: the seconds of one pass over the DataLoader, of one graph build and of one
HVP. Take timings only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workloads import make_workload  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example"))
from common import CountingLoader  # noqa: E402  (example/common.py)

from hessian_eigenthings import (  # noqa: E402
    Hessian,
    HVPOperator,
    compute_hessian_eigenthings,
    hessian_density,
    hessian_trace,
)


class ForwardCounter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self._count)

    def _count(self, *args) -> None:
        self.calls += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def helpers(model, loader, criterion, settings: dict, options: dict) -> tuple[list[float], int]:
    top = compute_hessian_eigenthings(model, loader, criterion, num_eigenthings=settings["k"], which="LA",
                                      seed=settings["seed"], **options)
    trace = hessian_trace(model, loader, criterion, max_products=settings["trace_products"], seed=settings["seed"],
                          **options)
    density = hessian_density(model, loader, criterion, num_probes=settings["probes"], num_steps=settings["steps"],
                              seed=settings["seed"], **options)
    products = top.num_products + trace.num_products + density.num_products
    return [float(top.eigenvalues[0]), trace.estimate, density.extremes[1]], products


def one_object(kept: bool) -> Callable:
    def run(model, loader, criterion, settings: dict, options: dict) -> tuple[list[float], int]:
        h = Hessian(model, loader, criterion, **options)
        with h if kept else _nothing():
            top = h.eigenvalues(settings["k"], which="LA", seed=settings["seed"])
            trace = h.trace(max_products=settings["trace_products"], seed=settings["seed"])
            density = h.density(settings["probes"], settings["steps"], seed=settings["seed"])
        return [float(top.eigenvalues[0]), trace.estimate, density.extremes[1]], h.operator.num_products

    return run


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def make_loader(work, args: argparse.Namespace, decode_ms: float) -> torch.utils.data.DataLoader:
    """The workload's samples as a DataLoader in a fixed order, ``decode_ms`` of waiting per batch."""
    def collate(samples: list) -> list:
        if decode_ms:
            time.sleep(decode_ms / 1e3)
        return torch.utils.data.default_collate(samples)

    return torch.utils.data.DataLoader(_dataset(work), batch_size=args.batch_size, shuffle=False, collate_fn=collate)


def measure(run: Callable, work, args: argparse.Namespace, device: torch.device, settings: dict,
            decode_ms: float) -> dict:
    """The fastest of ``args.repeats`` runs (after one untimed warm-up), with the counts of the last."""
    options = dict(use_gpu=device.type == "cuda", device=device, verbose=False)
    best: Optional[dict] = None
    for attempt in range(args.repeats + 1):
        loader = CountingLoader(make_loader(work, args, decode_ms))
        counter = ForwardCounter(work.model)
        try:
            _sync(device)
            start = time.perf_counter()
            numbers, products = run(work.model, loader, work.criterion, settings, options)
            _sync(device)
            seconds = time.perf_counter() - start
        finally:
            counter.handle.remove()
        if attempt == 0:
            continue  # warm-up: first use of the kernels and allocator
        if best is None or seconds < best["seconds"]:
            best = {"seconds": seconds, "products": products, "forwards": counter.calls, "passes": loader.passes,
                    "numbers": numbers}
    return best


def unit_costs(work, args: argparse.Namespace, device: torch.device, decode_ms: float) -> dict:
    """Seconds of one pass over the DataLoader (reading it and copying to the device), one graph build
    (every micro-batch's forward pass and gradient graph) and one HVP that reuses kept graphs; the
    fastest of five each. The saving of one object is about two reads (and, inside ``with``, two
    builds) in three calls."""
    loader = make_loader(work, args, decode_ms)
    reads, builds, products = [], [], []
    op = HVPOperator(work.model, loader, work.criterion, use_gpu=device.type == "cuda", device=device)
    v = torch.randn(op.size, generator=torch.Generator().manual_seed(0)).to(device)
    op.apply(v)  # reads and caches the batches
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        for x, y in loader:
            x.to(device), y.to(device)
        _sync(device)
        reads.append(time.perf_counter() - start)
        with op.frozen():
            seconds = []
            for _ in range(2):
                start = time.perf_counter()
                op.apply(v)
                _sync(device)
                seconds.append(time.perf_counter() - start)
        builds.append(seconds[0] - seconds[1])
        products.append(seconds[1])
    return {"read": min(reads), "build": max(min(builds), 0.0), "product": min(products)}


def _dataset(work) -> torch.utils.data.TensorDataset:
    x = torch.cat([b[0] for b in work.batches]).cpu()
    y = torch.cat([b[1] for b in work.batches]).cpu()
    return torch.utils.data.TensorDataset(x, y)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="mlp", choices=["mlp", "cnn", "transformer"],
                        help="a workload of benchmarks/workloads.py (default mlp)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="small model and budgets (a smoke test)")
    parser.add_argument("--batch-size", type=int, default=64, help="DataLoader batch size (default 64)")
    parser.add_argument("--k", type=int, default=None, help="top eigenvalues (default 5; 1 with --quick)")
    parser.add_argument("--trace-products", type=int, default=None, help="Hutch++ budget (default 102; 30 quick)")
    parser.add_argument("--probes", type=int, default=None, help="SLQ probes (default 10; 2 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="Lanczos steps per probe (default 80; 20 quick)")
    parser.add_argument("--decode-ms", default="0,20",
                        help="comma list of milliseconds of waiting per DataLoader batch, one table each "
                             "(default 0,20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per way, fastest shown (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    defaults = (1, 30, 2, 20) if args.quick else (5, 102, 10, 80)
    settings = {name: value if value is not None else default for name, value, default in zip(
        ("k", "trace_products", "probes", "steps"), (args.k, args.trace_products, args.probes, args.steps), defaults)}
    settings["seed"] = args.seed

    print("building and training the workload...", file=sys.stderr, flush=True)
    work = make_workload(args.workload, device, args.quick, False, args.seed)
    print(f"{work.description}; n = {work.num_params} parameters; DataLoader of {work.num_samples} samples in "
          f"batches of {args.batch_size}; top {settings['k']} eigenvalues (LA), Hutch++ trace with "
          f"{settings['trace_products']} products, SLQ with {settings['probes']} probes x {settings['steps']} steps; "
          f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)\n")
    ways = {"helpers": helpers, "Hessian": one_object(False), "with Hessian": one_object(True)}
    for decode_ms in [float(item) for item in args.decode_ms.split(",")]:
        rows = {name: measure(run, work, args, device, settings, decode_ms) for name, run in ways.items()}
        print(f"DataLoader with {decode_ms:g} ms of decoding per batch:\n")
        print_table(rows, unit_costs(work, args, device, decode_ms))


def print_table(rows: dict, costs: dict) -> None:
    base = rows["helpers"]
    header = (f"| {'way':<13} | {'HVPs':>5} | {'forward passes':>14} | {'dataloader passes':>17} | {'seconds':>8} | "
              f"{'saving':>8} | {'numbers vs helpers':>18} |")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    for name, row in rows.items():
        diff = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(row["numbers"], base["numbers"]))
        saving = 1 - row["seconds"] / base["seconds"]
        print(f"| {name:<13} | {row['products']:>5} | {row['forwards']:>14} | {row['passes']:>17} | "
              f"{row['seconds']:>8.3f} | {saving:>8.1%} | {diff:>18.1e} |")
    products, total = base["products"], base["seconds"]
    print(f"\nWhat the saving is made of (fastest of five each): one pass over the DataLoader "
          f"{costs['read'] * 1e3:.1f} ms, one graph build {costs['build'] * 1e3:.1f} ms, one HVP with kept graphs "
          f"{costs['product'] * 1e3:.2f} ms ({products} HVPs: {products * costs['product']:.3f} s of the helpers' "
          f"{total:.3f} s). Expected saving: two reads, {2 * costs['read'] / total:.1%} (Hessian); two reads "
          f"and two builds, {2 * (costs['read'] + costs['build']) / total:.1%} (with Hessian).\n")


if __name__ == "__main__":
    main()
