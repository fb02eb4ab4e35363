"""Diagonals of the loss Hessian and of the GGN: cost relative to one gradient, and error.

For the benchmark's MLP (digits) and CNN workloads (see ``workloads.py``), this times over the
same data: one gradient (forward and backward over every batch), HesScale (``hesscale``, and its
Gauss-Newton variant ``hesscale ggn``), the one-draw Monte-Carlo GGN diagonal (``ggn_mc``), the
exact GGN diagonal (``ggn_exact``, one backward pass per class) and one Hutchinson probe (one
Hessian-vector product, inside ``frozen()`` as the estimator runs it). Each time is the median of
``--repeats`` ratios (method time / gradient time, the two timed back to back so that drift of a
shared machine cancels).

The error of each diagonal is measured against the exact diagonals (Hessian and GGN) on a random
sample of coordinates (``--coordinates``, drawn within every parameter tensor; all of them when
the model is that small), from products with unit vectors in float64. The Hutchinson estimate is
given as many probes as fit in HesScale's time (at least one), so the two compare at equal time.

    python benchmarks/diagonals.py --quick            # a check that it runs (small models)
    python benchmarks/diagonals.py --threads 1        # the table, on an otherwise idle machine

Targets: HesScale and the Monte-Carlo GGN diagonal at most 2x a gradient.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

from hessian_eigenthings import GGNOperator, HVPOperator, ggn_diagonal, hesscale_diagonal, hutchinson_diagonal
from workloads import Workload, make_workload


def _seconds(fn: Callable[[], object]) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def paired_ratio(fn: Callable[[], object], gradient: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median over ``repeats`` of (time of ``fn``) / (time of one gradient pass), the two timed back to
    back after a warm-up of each, so that drift of a shared machine cancels; and ``fn``'s last result."""
    fn(), gradient()
    ratios, result = [], None
    for _ in range(repeats):
        grad_time, _ = _seconds(gradient)
        seconds, result = _seconds(fn)
        ratios.append(seconds / grad_time)
    return statistics.median(ratios), result


def gradient_pass(work: Workload) -> Callable[[], list[Tensor]]:
    params = [p for p in work.model.parameters() if p.requires_grad]

    def run() -> list[Tensor]:
        total = [torch.zeros_like(p) for p in params]
        for x, y in work.batches:
            for acc, g in zip(total, torch.autograd.grad(work.criterion(work.model(x), y), params)):
                acc.add_(g, alpha=len(x))
        return total

    return run


def sampled_coordinates(work: Workload, per_tensor: int, seed: int) -> Tensor:
    """Flat indices: up to ``per_tensor`` random coordinates of every parameter tensor."""
    gen = torch.Generator().manual_seed(seed)
    picks, start = [], 0
    for p in work.model.parameters():
        count = min(per_tensor, p.numel())
        picks.append(start + torch.randperm(p.numel(), generator=gen)[:count])
        start += p.numel()
    return torch.sort(torch.cat(picks)).values


def exact_entries(op, coordinates: Tensor, block: int = 64) -> Tensor:
    """``A_ii`` for the given i, from products with unit vectors (in the operator's dtype)."""
    out = torch.empty(len(coordinates), dtype=torch.float64)
    with op.frozen():
        for start in range(0, len(coordinates), block):
            chunk = coordinates[start : start + block]
            units = torch.zeros(op.size, len(chunk), dtype=op.dtype, device=op.device)
            units[chunk.to(op.device), torch.arange(len(chunk), device=op.device)] = 1
            out[start : start + len(chunk)] = op.apply_block(units)[chunk.to(op.device)].diagonal().double().cpu()
    return out


def relative_error(found: Tensor, truth: Tensor) -> float:
    return float((found.double().cpu() - truth).norm() / truth.norm())


def measure(work: Workload, args: argparse.Namespace) -> tuple[list[tuple], float, int]:
    options = dict(use_gpu=work.batches[0][0].is_cuda, verbose=False, max_possible_gpu_samples=4096)
    gradient = gradient_pass(work)
    grad_time = statistics.median(_seconds(gradient)[0] for _ in range(args.repeats))
    reference = work.in_float64()
    ref_options = dict(use_gpu=options["use_gpu"], max_possible_gpu_samples=4096)
    coordinates = sampled_coordinates(work, args.coordinates, args.seed)
    exact_h = exact_entries(HVPOperator(reference.model, reference.batches, reference.criterion, **ref_options),
                            coordinates)
    exact_g = exact_entries(GGNOperator(reference.model, reference.batches, reference.criterion, **ref_options),
                            coordinates)

    def row(name: str, ratio: float, diagonal: Tensor) -> tuple:
        picked = diagonal.detach().reshape(-1)[coordinates.to(diagonal.device)]
        return (name, ratio, relative_error(picked, exact_h), relative_error(picked, exact_g))

    rows: list[tuple] = []
    model, data, loss = work.model, work.batches, work.criterion
    hesscale_ratio, estimate = paired_ratio(lambda: hesscale_diagonal(model, data, loss, **options), gradient,
                                            args.repeats)
    rows.append(row("hesscale", hesscale_ratio, estimate.diagonal))
    ratio, estimate = paired_ratio(lambda: hesscale_diagonal(model, data, loss, curvature="ggn", **options), gradient,
                                   args.repeats)
    rows.append(row("hesscale, curvature='ggn'", ratio, estimate.diagonal))
    ratio, estimate = paired_ratio(
        lambda: ggn_diagonal(model, data, loss, mc_samples=1, seed=args.seed, **options), gradient, args.repeats)
    rows.append(row("ggn_mc (1 draw)", ratio, estimate.diagonal))
    ratio, estimate = paired_ratio(lambda: ggn_diagonal(model, data, loss, **options), gradient,
                                   max(1, args.repeats // 2))
    rows.append(row("ggn_exact", ratio, estimate.diagonal))

    op = HVPOperator(model, data, loss, **{k: v for k, v in options.items() if k != "verbose"})
    probe = torch.randn(op.size, 1, dtype=op.dtype, device=op.device)
    with op.frozen():
        probe_ratio, _ = paired_ratio(lambda: op.apply_block(probe), gradient, args.repeats)
    probes = max(1, int(hesscale_ratio / probe_ratio))
    ratio, estimate = paired_ratio(
        lambda: hutchinson_diagonal(op, max_products=probes, block_size=min(probes, 16), seed=args.seed, verbose=False),
        gradient, max(1, args.repeats // 2))
    rows.append(row(f"hutchinson, {probes} probe(s) (HesScale's time)", ratio, estimate.diagonal))
    rows.append(("one Hessian-vector product (kept graphs)", probe_ratio, float("nan"), float("nan")))
    return rows, grad_time, len(coordinates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small models and few repeats: checks that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per entry (default 7, quick 2)")
    parser.add_argument("--coordinates", type=int, default=None,
                        help="random coordinates per parameter tensor for the error (default 256, quick 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.coordinates = args.coordinates or (32 if args.quick else 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s), "
          f"median of {args.repeats} runs{' (quick)' if args.quick else ''}\n")
    for name in args.workloads:
        work = make_workload(name, device, args.quick, False, args.seed)
        rows, grad_time, sampled = measure(work, args)
        print(f"### {work.description}: {work.num_params} parameters, {work.num_samples} samples, "
              f"gradient {1000 * grad_time:.1f} ms\n")
        print(f"Errors on {sampled} sampled coordinates: ||d - d_exact|| / ||d_exact||.\n")
        print("| method | time / gradient | error vs Hessian diagonal | error vs GGN diagonal |")
        print("|---|---|---|---|")
        for method, ratio, err_h, err_g in rows:
            fmt = lambda e: "-" if e != e else f"{e:.3f}"  # noqa: E731
            print(f"| {method} | {ratio:.2f}x | {fmt(err_h)} | {fmt(err_g)} |")
        print()


if __name__ == "__main__":
    main()
