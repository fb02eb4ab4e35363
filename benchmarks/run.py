"""Benchmark: top-k Hessian eigenpairs by this package's solvers and by other libraries, side by side.

    python benchmarks/run.py --quick                       # small CPU run, a few minutes on 2 cores
    python benchmarks/run.py                               # default sizes, CPU
    python benchmarks/run.py --device cuda --gpu-sized     # GPU sizes, adds a ResNet-18 (11M params)
    python benchmarks/run.py --workloads mlp,transformer --methods thick_restart,lanczos --k 1

For every workload and method the table gives the wall time, the number of Hessian-vector
products, the peak memory (CUDA: peak allocated device memory above the start; CPU: peak resident
memory above the start, sampled every 2 ms), and the accuracy against a float64 reference: the
largest relative eigenvalue error and the largest relative residual ``||H v - lambda v|| / |lambda|``,
both measured with the float64 Hessian. A second table gives each native solver's speed-up (time
and products) against every baseline. All methods target the same relative tolerance (--tol).

Baselines: this package's "lanczos" (scipy ARPACK) and "power_iter" modes; curvlinops'
HessianLinearOperator with scipy eigsh; PyHessian's eigenvalues(). The last two are optional
benchmark-only dependencies (``pip install curvlinops-for-pytorch pyhessian``); a missing or
failing one is skipped with a note.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines import Skipped, curvlinops_eigsh, curvlinops_product_error, pyhessian_eigenvalues  # noqa: E402
from workloads import WORKLOADS, Workload, make_workload  # noqa: E402

from hessian_eigenthings import HVPOperator, compute_hessian_eigenthings, lanczos  # noqa: E402

NATIVE = ("thick_restart", "block_lanczos")
BASELINES = ("lanczos", "power_iter", "curvlinops", "pyhessian")
METHODS = NATIVE + BASELINES


@dataclass
class Row:
    method: str
    seconds: float = float("nan")
    products: Optional[int] = None
    peak_mb: float = float("nan")
    eig_error: float = float("nan")
    residual: float = float("nan")
    note: str = ""
    ok: bool = True
    extra: dict = field(default_factory=dict)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or resident memory on a CPU
    (sampled by a thread, as torch's CPU allocations are invisible to tracemalloc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
        else:
            self._start = _rss_bytes()
            self._peak = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, _rss_bytes()) - self._start) / 2**20


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no sampling, the column reads 0
        return 0


def run_method(method: str, work: Workload, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int, str]:
    """One solve; returns (eigenvalues (k,), eigenvectors (k, n) float64, products, note)."""
    device = torch.device(args.device)
    common = dict(use_gpu=device.type == "cuda", device=device, verbose=False,
                  max_possible_gpu_samples=max(len(x) for x, _ in work.batches))
    if method in NATIVE or method == "lanczos":
        result = compute_hessian_eigenthings(work.model, work.batches, work.criterion, args.k, mode=method,
                                             tol=args.tol, seed=args.seed, **common)
        note = "" if result.converged.all() else "not converged"
        if method == "lanczos":
            note = f"incl. {args.k} residual products" + (f", {note}" if note else "")
        return result.eigenvalues, result.eigenvectors, result.num_products, note
    if method == "power_iter":
        result = compute_hessian_eigenthings(work.model, work.batches, work.criterion, args.k, mode="power_iter",
                                             power_iter_steps=args.power_steps, power_iter_err_threshold=args.tol,
                                             seed=args.seed, **common)
        note = "" if result.converged.all() else f"not converged in {args.power_steps} steps/pair"
        return result.eigenvalues, result.eigenvectors, result.num_products, note
    if method == "curvlinops":
        vals, vecs, products = curvlinops_eigsh(work, args.k, args.tol, args.seed)
        return vals, vecs, products, ""
    if method == "pyhessian":
        vals, vecs, products = pyhessian_eigenvalues(work, args.k, args.tol, args.power_steps, args.seed)
        return vals, vecs, products, f"stops on eigenvalue change < tol, maxIter {args.power_steps}"
    raise ValueError(method)


def reference(work64: Workload, k: int, device: torch.device) -> tuple[np.ndarray, HVPOperator, float]:
    """Float64 eigenvalues by ARPACK to 1e-10 (k + 2 of them, for robust matching) and the operator."""
    op = HVPOperator(work64.model, work64.batches, work64.criterion, device=device,
                     max_possible_gpu_samples=max(len(x) for x, _ in work64.batches))
    result = lanczos(op, k + 2, tol=1e-10, max_steps=100, verbose=False)
    return result.eigenvalues[:k], op, float(np.max(result.relative_residuals[:k]))


def accuracy(vals: np.ndarray, vecs: np.ndarray, ref_vals: np.ndarray, op64: HVPOperator) -> tuple[float, float]:
    """(max relative eigenvalue error, max relative residual), pairs ordered by decreasing |lambda|."""
    order = np.argsort(-np.abs(vals), kind="stable")
    vals, vecs = np.asarray(vals, dtype=np.float64)[order], np.asarray(vecs, dtype=np.float64)[order]
    error = float(np.max(np.abs(vals - ref_vals[: len(vals)]) / np.abs(ref_vals[: len(vals)])))
    block = torch.as_tensor(vecs.T.copy(), dtype=torch.float64, device=op64.device)
    block = block / torch.linalg.vector_norm(block, dim=0, keepdim=True)
    lam = torch.as_tensor(vals, dtype=torch.float64, device=op64.device)
    res = torch.linalg.vector_norm(op64.apply_block(block) - block * lam, dim=0) / lam.abs()
    return error, float(res.max())


def bench_workload(work: Workload, args: argparse.Namespace) -> tuple[list[Row], float]:
    device = torch.device(args.device)
    ref_vals, op64, ref_residual = reference(work.in_float64(), args.k, device)
    # One product first, so that no method pays for one-time setup (allocator, autograd, kernels).
    warm = HVPOperator(work.model, work.batches, work.criterion, device=device)
    warm.apply(torch.zeros(warm.size, dtype=warm.dtype, device=device))
    rows = []
    for method in args.methods:
        row = Row(method)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with PeakMemory(device) as memory:
                    start = time.perf_counter()
                    vals, vecs, products, note = run_method(method, work, args)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    row.seconds = time.perf_counter() - start
            row.peak_mb, row.products, row.note = memory.peak_mb, products, note
            row.eig_error, row.residual = accuracy(vals, vecs, ref_vals, op64)
            if method == "curvlinops":
                off = curvlinops_product_error(work, op64, args.seed)
                if off > 1e-4:
                    row.note = f"its H v is {off:.1e} off the float64 product"
        except Skipped as exc:
            row.ok, row.note = False, f"skipped: {exc}"
        except Exception as exc:  # a baseline that fails is reported, not fatal
            row.ok, row.note = False, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
        rows.append(row)
        print(f"  {method:14s} {_fmt_row(row)}", file=sys.stderr, flush=True)
    return rows, ref_residual


def _fmt_row(row: Row) -> str:
    if not row.ok:
        return row.note
    return (f"{row.seconds:8.2f} s {row.products:6d} HVPs {row.peak_mb:8.1f} MB "
            f"err {row.eig_error:.1e} res {row.residual:.1e} {row.note}")


def markdown_tables(work: Workload, rows: list[Row], ref_residual: float, args: argparse.Namespace) -> str:
    lines = [f"### {work.name}: {work.description}", "",
             f"{work.num_params:,} parameters, {work.num_samples} samples, top {args.k} (largest |lambda|), "
             f"tol {args.tol:g}; float64 reference residual {ref_residual:.1e}.", "",
             "| method | time (s) | HVPs | peak mem (MB) | max rel. eig. error | max rel. residual | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        if row.ok:
            lines.append(f"| {row.method} | {row.seconds:.2f} | {row.products} | {row.peak_mb:.1f} | "
                         f"{row.eig_error:.1e} | {row.residual:.1e} | {row.note} |")
        else:
            lines.append(f"| {row.method} | - | - | - | - | - | {row.note} |")
    natives = [r for r in rows if r.method in NATIVE and r.ok]
    baselines = [r for r in rows if r.method in BASELINES and r.ok]
    if natives and baselines:
        lines += ["", "Speed-up of each native solver (baseline time / native time, baseline HVPs / native HVPs):", "",
                  "| native \\ baseline | " + " | ".join(b.method for b in baselines) + " |",
                  "|---|" + "---:|" * len(baselines)]
        for nat in natives:
            cells = [f"{b.seconds / nat.seconds:.2f}x time, {b.products / nat.products:.2f}x HVPs" for b in baselines]
            lines.append(f"| {nat.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine_header(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU: {cpu}"
    versions = [f"torch {torch.__version__}"]
    for name in ("scipy", "curvlinops", "pyhessian"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '(installed)')}")
        except Exception:
            versions.append(f"{name} (not installed)")
    return (f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
            f"- machine: {device}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}\n"
            f"- versions: {', '.join(versions)}, Python {platform.python_version()}\n"
            f"- command: `python {' '.join(sys.argv)}`\n")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--k", type=int, default=None, help="eigenpairs per solve (default 10; 5 with --quick)")
    parser.add_argument("--workloads", default=None,
                        help=f"comma list from {','.join(WORKLOADS)} (default mlp,cnn,transformer; "
                             f"with --gpu-sized also resnet)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="small models and k=5: a few minutes on a 2-core CPU")
    parser.add_argument("--gpu-sized", action="store_true",
                        help="GPU sizes: MLP 1024 wide (1.1M params), 4x256 transformer, and ResNet-18 (11M)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual target of every method")
    parser.add_argument("--power-steps", type=int, default=None,
                        help="power iteration / PyHessian steps per eigenpair (default 100, PyHessian's maxIter)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    args.k = args.k or (5 if args.quick else 10)
    args.power_steps = args.power_steps or 100
    default_workloads = "mlp,cnn,transformer" + (",resnet" if args.gpu_sized else "")
    args.workloads = [w.strip() for w in (args.workloads or default_workloads).split(",") if w.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, allowed, given in (("workloads", WORKLOADS, args.workloads), ("methods", METHODS, args.methods)):
        unknown = [x for x in given if x not in allowed]
        if unknown:
            parser.error(f"unknown {name}: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False here")
    if "resnet" in args.workloads and not args.gpu_sized:
        parser.error("the resnet workload is GPU-sized: add --gpu-sized (and --device cuda)")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = ["## Results", "", machine_header(args)]
    print(report[-1], flush=True)
    for name in args.workloads:
        print(f"{name}: building and training...", file=sys.stderr, flush=True)
        work = make_workload(name, torch.device(args.device), args.quick, args.gpu_sized, args.seed)
        rows, ref_residual = bench_workload(work, args)
        tables = markdown_tables(work, rows, ref_residual, args)
        print(tables, flush=True)
        report.append(tables)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(report))


if __name__ == "__main__":
    main()
