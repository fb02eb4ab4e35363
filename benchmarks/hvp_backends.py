"""Cost of one Hessian-vector product per vector, as a multiple of one gradient, for each product plan.

For each workload of ``benchmarks/workloads.py`` this times, over the same batches as one full-dataset
gradient (plain autograd, the batches as they are):

* ``kept x1``: one vector by double backward inside ``Operator.frozen()`` (as every solver runs
  it): one backward pass through each micro-batch's kept first-order graph;
* ``fresh x1``: one vector by double backward outside ``frozen()``: forward, gradient and second pass;
* ``kept b``: a block of b vectors inside ``frozen()``, the kept graph's second backward vmapped
  over the block;
* ``fwd-rev b``: a block of b vectors by forward-over-reverse (``jvp`` of ``grad``) vmapped over the
  block, afresh: one forward pass shared by the b vectors, no kept graph;
* ``linearize x1`` / ``linearize b``: ``torch.func.linearize`` of the gradient, kept per micro-batch
  inside ``frozen()``, so that a product is one (vmapped) jvp; its set-up (the tracing, paid once per
  solve) is shown separately, in seconds and in gradients;
* ``chosen b``: what the operator's own plan book chose for blocks of b inside ``frozen()``
  (``backend="auto"``, after the single products a solver starts with), and its cost.

Each entry is the median over ``--repeats`` of (product time / gradient time), the two timed back to
back after a warm-up (for a kept plan the warm-up is the product that builds the kept work), so that
drift of a shared machine cancels; a product slower than 1 s is timed once. On CUDA each cell also
gives the product's peak device memory above its start (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``). The run ends with a verdict per workload: the chosen block plan costs
at most 2x a gradient per vector.

    python benchmarks/hvp_backends.py --quick --threads 1          # tiny workloads, CPU
    python benchmarks/hvp_backends.py --device cuda --gpu-sized    # ResNet-18 and the 4x256 GPT

On a machine shared with other jobs, several OpenMP threads per process spin against each other
and distort every number; ``--threads 1`` gives stable ratios there.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from typing import Callable, Optional

from torch import Tensor

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run import TimeCap, time_cap  # noqa: E402
from workloads import WORKLOADS, Workload, make_workload  # noqa: E402

from hessian_eigenthings import HVPOperator  # noqa: E402

#: The most a chosen block plan may cost per vector, in gradients.
TARGET_PER_VECTOR = 2.0
#: Products slower than this are timed once after their warm-up.
SLOW_PRODUCT_SECONDS = 1.0
#: Single products a solver starts with before its first block (one builds the kept graphs): the
#: plan book then knows what the kept second pass costs against the pass it saves.
SINGLES_FIRST = 4


# -- timing ---------------------------------------------------------------------------------------
class Entry:
    """One cell: product time / gradient time per vector, and the peak device memory (CUDA)."""

    def __init__(self, ratio: float = float("nan"), peak_bytes: Optional[int] = None, note: str = "") -> None:
        self.ratio, self.peak_bytes, self.note = ratio, peak_bytes, note

    def cell(self) -> str:
        if self.note and math.isnan(self.ratio):
            return self.note
        text = f"{self.ratio:.2f}"
        if self.peak_bytes is not None:
            text += f" ({self.peak_bytes / 2**20:.0f} MB)"
        return text + (f" {self.note}" if self.note else "")


def timed(fn: Callable[[], object], device: torch.device, memory: bool = False) -> tuple[float, Optional[int]]:
    """(seconds of ``fn()``, its peak device memory above the start on CUDA with ``memory``)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        if memory:
            start_bytes = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - start_bytes if cuda and memory else None
    return seconds, peak


def paired_ratio(product: Callable[[], object], gradient: Callable[[], object], repeats: int, width: int,
                 device: torch.device) -> Entry:
    """Median over ``repeats`` of (one product / one gradient) / ``width``, each pair timed back to
    back after one warm-up of each (a product slower than :data:`SLOW_PRODUCT_SECONDS`: one pair)."""
    warm, _ = timed(product, device)
    gradient()
    repeats = 1 if warm > SLOW_PRODUCT_SECONDS else repeats
    ratios, peak = [], None
    for _ in range(repeats):
        seconds_gradient, _ = timed(gradient, device)
        seconds, peak_bytes = timed(product, device, memory=True)
        ratios.append(seconds / seconds_gradient)
        peak = peak_bytes if peak is None else max(peak, peak_bytes)
    return Entry(statistics.median(ratios) / width, peak)


def gradient_fn(work: Workload) -> Callable[[], object]:
    """One full-dataset gradient, computed like the products: per batch, weighted by its size."""
    model, criterion = work.model, work.criterion
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(len(y) for _, y in work.batches)

    def gradient() -> list[torch.Tensor]:
        acc = [torch.zeros_like(p) for p in params]
        for x, y in work.batches:
            grads = torch.autograd.grad(criterion(model(x), y), params)
            for a, g in zip(acc, grads):
                a.add_(g, alpha=len(y) / total)
        return acc

    return gradient


# -- the plans ------------------------------------------------------------------------------------
def operator(work: Workload, device: torch.device, **options: object) -> HVPOperator:
    return HVPOperator(work.model, work.batches, work.criterion, device=device,
                       max_possible_gpu_samples=max(len(y) for _, y in work.batches), **options)


def measure_workload(work: Workload, args: argparse.Namespace) -> tuple[list[str], Optional[float]]:
    """The row of one workload, and the chosen block plan's cost per vector (None if not measured)."""
    device = torch.device(args.device)
    work.model.eval()
    gradient = gradient_fn(work)
    gradient()
    grad_seconds = statistics.median(timed(gradient, device)[0] for _ in range(args.repeats))
    b, n = args.width, work.num_params
    gen = torch.Generator().manual_seed(0)
    single = torch.randn(n, 1, generator=gen).to(device)
    block = torch.randn(n, b, generator=gen).to(device)

    def capped(measure: Callable[[], Entry]) -> Entry:
        try:
            with time_cap(args.entry_cap):
                return measure()
        except TimeCap:
            return Entry(note=f"> {args.entry_cap:.0f} s (stopped)")
        except Exception as exc:  # a plan this model cannot run is reported, not fatal
            return Entry(note=f"failed: {type(exc).__name__}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def kept(vectors: Tensor, **options: object) -> Entry:
        op = operator(work, device, **options)
        with op.frozen():  # the warm-up product builds the kept work
            return paired_ratio(lambda: op.apply_block(vectors), gradient, args.repeats, vectors.shape[1], device)

    def fresh(vectors: Tensor, **options: object) -> Entry:
        op = operator(work, device, **options)
        return paired_ratio(lambda: op.apply_block(vectors), gradient, args.repeats, vectors.shape[1], device)

    entries = {
        "kept x1": capped(lambda: kept(single, backend="double_backward", batched=False)),
        "fresh x1": capped(lambda: fresh(single, backend="double_backward", batched=False)),
        f"kept b={b}": capped(lambda: kept(block, backend="double_backward", batched=True)),
        f"fwd-rev b={b}": capped(lambda: fresh(block, backend="forward_over_reverse", batched=True)),
    }
    setup = [float("nan")]
    linearized: dict[int, Entry] = {}

    def linearize() -> Entry:
        # One operator: the trace is made once (the first single product) and serves both widths.
        op = operator(work, device, backend="linearize", batched=True)
        with op.frozen():
            build, _ = timed(lambda: op.apply_block(single), device)
            linearized[1] = paired_ratio(lambda: op.apply_block(single), gradient, args.repeats, 1, device)
            setup[0] = max(0.0, build - linearized[1].ratio * grad_seconds)
            linearized[b] = paired_ratio(lambda: op.apply_block(block), gradient, args.repeats, b, device)
        return linearized[b]

    stopped = capped(linearize)
    entries["linearize x1"] = linearized.get(1, stopped)
    entries[f"linearize b={b}"] = linearized.get(b, stopped)
    linearize_setup = setup[0]
    chosen_name = ["-"]

    def chosen() -> Entry:
        op = operator(work, device)
        with op.frozen():
            for _ in range(SINGLES_FIRST):
                op.apply_block(single)
            for _ in range(8):  # its trials are real products; then the choice stands
                op.apply_block(block)
                if b in op.kept_graph_plan and not _still_trying(op, b):
                    break
            backend, batched = op.kept_graph_plan.get(b, ("?", False))
            kept_plan = backend == "double_backward"
            chosen_name[0] = ("kept " if kept_plan else "") + backend.replace("_", "-") + (" batched" if batched else "")
            return paired_ratio(lambda: op.apply_block(block), gradient, args.repeats, b, device)

    entries[f"chosen b={b}"] = capped(chosen)
    row = [work.name, f"{n:,}", f"{grad_seconds * 1e3:.1f}"] + [entry.cell() for entry in entries.values()]
    row.append("-" if math.isnan(linearize_setup) else
               f"{linearize_setup:.2f} s ({linearize_setup / grad_seconds:.0f} grads)")
    row.append(chosen_name[0])
    per_vector = entries[f"chosen b={b}"].ratio
    return row, (None if math.isnan(per_vector) else per_vector)


def _still_trying(op: HVPOperator, width: int) -> bool:
    """Whether the operator's next block product of ``width`` inside frozen() would still be a trial."""
    return op._next_plan(width, True)[1]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--workloads", default=None,
                        help=f"comma list from {','.join(WORKLOADS)} (default mlp,cnn,transformer; with --gpu-sized "
                             f"resnet,transformer)")
    parser.add_argument("--quick", action="store_true", help="tiny workloads (with --gpu-sized: toy GPU workloads)")
    parser.add_argument("--gpu-sized", action="store_true", help="the GPU sizes of benchmarks/run.py")
    parser.add_argument("--resnet-samples", type=int, default=512, help="ResNet-18 images (default 512)")
    parser.add_argument("--width", type=int, default=16, help="block width b (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per entry (median ratio reported)")
    parser.add_argument("--entry-cap", type=float, default=None, help="seconds one entry may take (default: no cap)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False here")
    default = "resnet,transformer" if args.gpu_sized else "mlp,cnn,transformer"
    names = [w.strip() for w in (args.workloads or default).split(",") if w.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads: {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if "resnet" in names and not (args.gpu_sized or args.quick):
        parser.error("the resnet workload is GPU-sized: add --gpu-sized, or --quick for a tiny one")
    logging.getLogger("hessian_eigenthings").setLevel(logging.WARNING)
    device = torch.device(args.device)
    b = args.width
    header = ["workload", "params", "grad ms", "kept x1", "fresh x1", f"kept b={b}", f"fwd-rev b={b}",
              "linearize x1", f"linearize b={b}", f"chosen b={b}", "linearize set-up", "chosen plan"]
    rows: list[list[str]] = []
    verdicts: list[str] = []

    resnet_note = f"; ResNet-18 on {args.resnet_samples} images" if "resnet" in names and not args.quick else ""

    def table() -> str:
        memory = " Each cell: the ratio, and on CUDA (in brackets) the product's peak memory above its start." \
            if device.type == "cuda" else ""
        lines = [f"Cost of one product per vector, as a multiple of one gradient ({device}"
                 f"{', ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, torch {torch.__version__}, "
                 f"{torch.get_num_threads()} thread(s), float32, median of {args.repeats} paired ratios"
                 f"{resnet_note}).{memory}", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", "```", *verdicts, "```", ""]
        return "\n".join(lines)

    for name in names:
        print(f"{name}: building...", file=sys.stderr, flush=True)
        work = make_workload(name, device, args.quick, args.gpu_sized, args.seed, resnet_samples=args.resnet_samples)
        row, per_vector = measure_workload(work, args)
        rows.append(row)
        print(" | ".join(row), flush=True)
        sized = "" if args.gpu_sized and not args.quick else " [not the target's sizes]"
        if per_vector is None:
            verdicts.append(f"VERDICT {name}: chosen block plan per vector <= {TARGET_PER_VECTOR:g}x a gradient{sized}: "
                            f"NOT MEASURED ({row[header.index(f'chosen b={b}')]})")
        else:
            state = "MET" if per_vector <= TARGET_PER_VECTOR else "MISSED"
            verdicts.append(f"VERDICT {name}: chosen block plan per vector <= {TARGET_PER_VECTOR:g}x a gradient{sized}: "
                            f"{row[-1]} {per_vector:.2f}x: {state}")
        if args.markdown:  # after every workload, so that a run stopped from outside keeps its rows
            with open(args.markdown, "w") as f:
                f.write(table())
    print("\n" + table(), flush=True)


if __name__ == "__main__":
    main()
