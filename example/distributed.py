"""Top Hessian eigenpairs with torch.distributed: every rank holds a shard of the digits data.

    torchrun --nproc_per_node=2 example/distributed.py                 # 2 CPU processes over gloo
    torchrun --nproc_per_node=2 example/distributed.py --compare       # also a single-process run on rank 0
    torchrun --nproc_per_node=2 example/distributed.py --backend nccl  # one GPU per process
    python example/distributed.py                                      # one process, no process group

Each rank trains the same MLP with DistributedDataParallel on its own shard (the 1797 digits split
899 + 898: uneven on purpose), then builds an HVPOperator on the DDP model and its shard. Every
product is one all-reduce, so every rank multiplies with the Hessian of the mean loss over the whole
dataset and every rank's solver returns the same eigenpairs; rank 0 prints them. With --compare,
rank 0 also solves with a rank-local operator over the whole dataset and prints the differences.
For several machines, see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import time
import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from hessian_eigenthings import HVPOperator, deflated_power_iteration, lanczos
from hessian_eigenthings.distributed import get_world_size, is_main_process, shard_indices
from common import HelpFormatter, add_training_options, digits_dataset, make_mlp, print_eigenpairs, train  # example/common.py


def setup(backend: str, timeout_s: float) -> torch.device:
    """Join the process group that torchrun describes in the environment; return this rank's device."""
    if "WORLD_SIZE" not in os.environ:
        print("Not started by torchrun: running as a single process without a process group.")
        return torch.device("cuda" if backend == "nccl" else "cpu")
    # The timeout bounds how long a rank waits in a collective for a rank that died or hangs.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def solve(operator: HVPOperator, args: argparse.Namespace):
    """The top eigenpairs by the chosen solver (the same call on every rank)."""
    if args.mode == "lanczos":
        return lanczos(operator, num_eigenthings=args.k, which=args.which, tol=args.tol, verbose=not args.quiet)
    return deflated_power_iteration(
        operator, num_eigenthings=args.k, which=args.which, power_iter_steps=args.power_iter_steps,
        power_iter_err_threshold=args.tol, verbose=not args.quiet,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run on this rank with command-line arguments ``argv`` (default: ``sys.argv[1:]``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                        help="gloo (CPU) or nccl (one GPU per process)")
    parser.add_argument("--k", type=int, default=5, help="number of eigenpairs")
    parser.add_argument("--mode", choices=["lanczos", "power_iter"], default="lanczos", help="solver")
    parser.add_argument("--which", choices=["LM", "LA", "SA"], default="LM",
                        help="which end of the spectrum: largest magnitude, largest, smallest")
    parser.add_argument("--tol", type=float, default=1e-6, help="relative residual tolerance")
    parser.add_argument("--power-iter-steps", type=int, default=1000, help="power iteration steps per pair")
    add_training_options(parser, device=False, batch_size=128, epochs=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout in seconds")
    parser.add_argument("--compare", action="store_true",
                        help="rank 0 also solves on the whole dataset alone and prints the differences")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.backend == "nccl" and not torch.cuda.is_available():
        parser.error("--backend nccl needs CUDA GPUs (one per process); use --backend gloo on CPUs.")
    logging.basicConfig(level=logging.WARNING)

    device = setup(args.backend, args.timeout)
    world = get_world_size()
    if not is_main_process():
        warnings.simplefilter("ignore")  # every rank would warn alike; rank 0 speaks for all

    dataset = digits_dataset()
    shard = torch.utils.data.Subset(dataset, list(shard_indices(len(dataset))))
    loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, shuffle=False)

    torch.manual_seed(args.seed)
    model = make_mlp(args.width).to(device)
    if dist.is_initialized():
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    start = time.perf_counter()
    loss = train(model, loader, args.epochs, device)
    sizes = [len(shard_indices(len(dataset), r, world)) for r in range(world)]
    if is_main_process():
        n = sum(p.numel() for p in model.parameters())
        print(f"{world} rank(s), shards of {sizes} samples; trained an MLP with {n} parameters for {args.epochs} "
              f"epochs ({time.perf_counter() - start:.1f} s), rank 0's last-epoch loss {loss:.4f}.")

    # The DDP model goes in as it is: the operator computes with model.module, and every product
    # is one all-reduce of the shards' sample-weighted products.
    operator = HVPOperator(model, loader, nn.functional.cross_entropy, use_gpu=device.type == "cuda", device=device)
    start = time.perf_counter()
    result = solve(operator, args)
    seconds = time.perf_counter() - start
    vals = torch.as_tensor(result.eigenvalues, dtype=torch.float64)

    spread = 0.0
    if dist.is_initialized():  # how far the ranks' eigenvalues are from rank 0's (0.0: identical)
        ref = vals.clone().to(device)
        dist.broadcast(ref, src=0)
        gap = (vals.to(device) - ref).abs().max()
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        spread = float(gap)

    if is_main_process():
        print(f"\n{args.mode} on {world} rank(s): {result.num_products} Hessian-vector products over "
              f"{operator.num_samples} samples, {seconds:.2f} s; largest difference between ranks: {spread:.3g}")
        print_eigenpairs(result)

    if args.compare:
        if is_main_process():
            whole = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
            single_op = HVPOperator(model, whole, nn.functional.cross_entropy, use_gpu=device.type == "cuda",
                                    device=device)
            single_op.reduce_across_ranks = False  # rank 0 alone, over every sample
            single = solve(single_op, args)
            single_vals = torch.as_tensor(single.eigenvalues, dtype=torch.float64)
            rel = ((vals - single_vals).abs() / single_vals.abs()).max()
            print(f"\nsingle process on all {single_op.num_samples} samples: {single.num_products} products")
            print(f"{'#':>3} {'distributed':>14} {'single':>14} {'rel. diff':>10}")
            for i, (a, b) in enumerate(zip(vals.tolist(), single_vals.tolist())):
                print(f"{i:>3} {a:>14.6f} {b:>14.6f} {abs(a - b) / abs(b):>10.2e}")
            print(f"largest relative difference {float(rel):.2e} (tolerance of the solves: {args.tol:g})")
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait here for rank 0's comparison

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
